"""Sweeps: configurations x seeds from a sweep file, shared runs reused across configurations,
and the mean ± std table (no training here: the planning and aggregation are checked directly;
the end-to-end test runs a real second configuration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from btx_megatron.config.experiment import ExperimentError
from btx_megatron.config.experiment_file import apply_overrides, parse_experiment
from btx_megatron.experiment.state import Check, StageRunner, State
from btx_megatron.experiment.sweep import (branch_edge, format_table, load_sweep, one_factor_series, own_expert_share,
                                         summarize, write_sweep_report)
from btx_megatron.launch.plan import plan_runs

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "examples" / "tiny" / "experiment.yaml"


def _sweep_file(tmp_path, **doc) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"experiment": str(EXPERIMENT), "output": str(tmp_path / "out"), **doc},
                                   sort_keys=False))
    return path


def test_configurations_times_grid_times_seeds(tmp_path):
    sweep = load_sweep(_sweep_file(
        tmp_path, seeds=[1, 2], base={"evaluation.eval_iters": 2},
        configurations={"paper": {}, "centroid": {"merge.router_init": "centroid"}},
        grid={"mix.train_iters": [100, 300]}))
    assert list(sweep.configurations) == ["paper+train_iters=100", "paper+train_iters=300",
                                          "centroid+train_iters=100", "centroid+train_iters=300"]
    assert sweep.configurations["centroid+train_iters=300"] == {
        "evaluation.eval_iters": 2, "merge.router_init": "centroid", "mix.train_iters": 300}
    runs = sweep.runs()
    assert len(runs) == 8
    name, seed, overrides = runs[1]
    assert (name, seed) == ("paper+train_iters=100", 2)
    assert overrides["branch_defaults.train.seed"] == 2 and overrides["merge.router_seed"] == 2
    assert overrides["output_dir"].endswith("out/paper+train_iters=100-s2")
    assert overrides["shared_runs_dir"].endswith("out/runs")
    # --only: the same runs (directories, overrides) as in the whole sweep, for those rows only.
    doc = dict(seeds=[1, 2], base={"evaluation.eval_iters": 2},
               configurations={"paper": {}, "centroid": {"merge.router_init": "centroid"}},
               grid={"mix.train_iters": [100, 300]})
    subset = load_sweep(_sweep_file(tmp_path, **doc), only=["centroid+train_iters=300"])
    assert subset.runs() == [r for r in runs if r[0] == "centroid+train_iters=300"]
    assert subset.factors == {"centroid+train_iters=300": {"mix.train_iters": 300}}
    with pytest.raises(ExperimentError, match="no configuration named 'centroid'; the sweep has paper"):
        load_sweep(_sweep_file(tmp_path, **doc), only=["centroid"])
    # --seeds: those seeds' runs, the same as in the whole sweep; shared_runs: another sweep's.
    one_seed = load_sweep(_sweep_file(tmp_path, **doc), seeds=[2])
    assert one_seed.runs() == [r for r in runs if r[1] == 2]
    with pytest.raises(ExperimentError, match=r"the sweep's seeds are \[1, 2\]; choose among them, not \[3\]"):
        load_sweep(_sweep_file(tmp_path, **doc), seeds=[3])
    other = load_sweep(_sweep_file(tmp_path, **doc, shared_runs=str(tmp_path / "study" / "runs")))
    assert [o["shared_runs_dir"] for _, _, o in other.runs()] == [str(tmp_path / "study" / "runs")] * 8
    assert [o["output_dir"] for _, _, o in other.runs()] == [o["output_dir"] for _, _, o in runs]
    with pytest.raises(ExperimentError, match="unknown sweep key"):
        load_sweep(_sweep_file(tmp_path, grids={}))
    with pytest.raises(ExperimentError, match="seeds must be a list of integers"):
        load_sweep(_sweep_file(tmp_path, seeds="1"))


def test_configurations_that_differ_in_the_mix_share_seed_and_branches(tmp_path, monkeypatch):
    monkeypatch.setenv("BTX_DATA_DIR", str(tmp_path / "data"))
    sweep = load_sweep(_sweep_file(tmp_path, configurations={"a": {}, "b": {"mix.train_iters": 30},
                                                             "c": {"branch_defaults.train.lr": 3e-4}}))
    raw = yaml.safe_load(EXPERIMENT.read_text())
    plans = {}
    for name, seed, overrides in sweep.runs():
        exp = parse_experiment(apply_overrides(raw, overrides), str(EXPERIMENT))
        exp.model["vocab_size"] = 1000  # no tokenizer on disk here
        plans[name] = plan_runs(exp)
    a, b, c = plans["a"], plans["b"], plans["c"]
    for run in ("seed", "math", "code", "wiki"):
        assert a[run].run_dir == b[run].run_dir and a[run].run_dir.parent == tmp_path / "out" / "runs"
        assert a[run].config.checkpoint.save == str(a[run].save_dir)
    assert a["math"].init_checkpoint == str(a["seed"].save_dir)
    assert a["mix"].run_dir != b["mix"].run_dir  # the mix phase differs, so does its run
    # Another branch LR: the same seed, other branches.
    assert c["seed"].run_dir == a["seed"].run_dir and c["math"].run_dir != a["math"].run_dir


def test_shipped_sweep_files_plan_and_the_ablations_share_the_studys_runs(tmp_path, monkeypatch):
    """examples/tiny/sweep.yaml and ablations.yaml: every row plans (no bad override key), and an
    ablation row trains only its merge and mix: its seed, branches and dense baseline are the
    study's shipped ones."""
    monkeypatch.setenv("BTX_DATA_DIR", str(tmp_path / "data"))
    raw = yaml.safe_load(EXPERIMENT.read_text())

    def plans(sweep):
        out = {}
        for name, seed, overrides in sweep.runs():
            exp = parse_experiment(apply_overrides(raw, overrides), str(EXPERIMENT))
            exp.model["vocab_size"] = 1024
            out[name, seed] = plan_runs(exp)
        return out

    study = plans(load_sweep(ROOT / "examples" / "tiny" / "sweep.yaml", str(tmp_path / "study"), seeds=[1234]))
    ablations = load_sweep(ROOT / "examples" / "tiny" / "ablations.yaml", str(tmp_path / "abl"),
                           shared_runs=str(tmp_path / "study" / "runs"))
    assert len(study) >= 12 and len(ablations.configurations) >= 11
    shipped = study["shipped", 1234]
    ablation_plans = plans(ablations)
    # Every mix phase is a model Megatron-Core accepts (e.g. a top-k router with top-1 is refused).
    from btx_megatron.models.gpt import transformer_config

    for (name, _), plan in [*ablation_plans.items(), *study.items()]:
        transformer_config(plan["mix"].config)
    for (name, _), plan in ablation_plans.items():
        for run in ("seed", "math", "code", "wiki"):
            assert plan[run].run_dir == shipped[run].run_dir, (name, run)
        # One dense baseline for every row: the shipped one's compute-matched length.
        assert plan["dense"].run_dir == ablation_plans["top-2", 1234]["dense"].run_dir
        assert plan["dense"].config.train.train_iters == 986 and "upcycling" not in plan


def test_evaluations_of_shared_runs_are_taken_from_the_results_cache(tmp_path):
    """Two experiments on one shared runs directory: the second takes the first's result for the
    same model (same evaluation options, same checkpoint fingerprint), adopted, not recomputed;
    another checkpoint fingerprint or other options are evaluated afresh."""
    from types import SimpleNamespace

    from btx_megatron.experiment.evaluation import _result_key, keep_results, shared_results
    from btx_megatron.experiment.state import eval_check

    shared = tmp_path / "runs"
    spec = {"num_samples": 8, "path": str(shared / "seed-abc" / "checkpoints")}

    def experiment(out: Path):
        runner = StageRunner(State(out / "stages.json"), {"evaluate"}, echo=lambda _: None)
        return SimpleNamespace(exp=SimpleNamespace(shared_runs_dir=str(shared)), runner=runner)

    built = []

    def evaluate(p, out: Path, fp: str, options=spec):
        outputs = {"evaluate:seed": out / "eval" / "seed.json"}
        members = {"evaluate:seed": (options, {"model": fp}, eval_check(outputs["evaluate:seed"], ["math"]))}
        keys = {"evaluate:seed": _result_key("evaluate", options, fp)}
        members = shared_results(p, members, outputs, keys)

        def build(checks):
            built.append(out.name)
            outputs["evaluate:seed"].parent.mkdir(parents=True, exist_ok=True)
            outputs["evaluate:seed"].write_text(json.dumps({"domains": {"math": {"loss": 1.0 + len(built)}}}))

        p.runner.ensure_group("evaluate", members, build, label="evaluate")
        keep_results(p, members, outputs, keys)
        return json.loads(outputs["evaluate:seed"].read_text())

    first = evaluate(experiment(tmp_path / "a"), tmp_path / "a", "fp1")
    second_p = experiment(tmp_path / "b")
    second = evaluate(second_p, tmp_path / "b", "fp1")
    assert built == ["a"] and second == first
    assert json.loads((tmp_path / "b" / "stages.json").read_text())["stages"]["evaluate:seed"]["adopted"] is True
    # Another checkpoint (fingerprint) or other evaluation options: evaluated, not taken.
    assert evaluate(experiment(tmp_path / "c"), tmp_path / "c", "fp2") != first
    evaluate(experiment(tmp_path / "d"), tmp_path / "d", "fp1", {**spec, "num_samples": 16})
    assert built == ["a", "c", "d"]
    # No shared runs directory: nothing is kept or taken.
    alone = SimpleNamespace(exp=SimpleNamespace(shared_runs_dir=None),
                            runner=StageRunner(State(tmp_path / "e" / "stages.json"), {"evaluate"}, echo=lambda _: None))
    evaluate(alone, tmp_path / "e", "fp1")
    assert built == ["a", "c", "d", "e"]


def test_a_shared_finished_run_is_adopted_not_rebuilt(tmp_path):
    runner = StageRunner(State(tmp_path / "stages.json"), {"branches"}, echo=lambda _: None)
    built = []
    fp = runner.ensure("branch:math", "branches", ["--lr", "1"], {}, lambda: Check(True, fingerprint={"x": "1"},
                                                                                  adoptable=True),
                       lambda check: built.append(1))
    assert built == [] and fp == {"x": "1"}
    record = json.loads((tmp_path / "stages.json").read_text())["stages"]["branch:math"]
    assert record["status"] == "done" and record["adopted"] is True
    # Not adoptable (not a content-addressed run): present outputs are rebuilt, as before.
    runner.ensure("branch:code", "branches", ["--lr", "1"], {}, lambda: Check(True, fingerprint={"x": "2"}),
                  lambda check: built.append(2))
    assert built == [2]


def _result(ppl: dict[str, float]) -> dict:
    return {"models": list(ppl), "rows": [{"average_ppl": v} for v in ppl.values()],
            "shape_checks": {"BTX beats dense on the average": ppl["btx"] < ppl["dense"]}}


def test_table_is_mean_and_std_over_seeds(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, seeds=[1, 2], configurations={"a": {}, "b": {"mix.train_iters": 30}}))
    results = {"a": {1: _result({"seed": 14.0, "dense": 12.0, "upcycling": 13.0, "btm": 12.5, "btx": 11.0}),
                     2: _result({"seed": 14.0, "dense": 12.0, "upcycling": 13.0, "btm": 12.5, "btx": 13.0})},
               "b": {1: _result({"seed": 14.0, "dense": 11.0, "upcycling": 13.0, "btm": 12.5, "btx": 12.0})}}
    summary = summarize(sweep, results, {"b-s2": "boom"})
    a = summary["rows"]["a"]
    assert a["models"]["btx"] == {"mean": 12.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert a["BTX - dense"]["mean"] == 0.0 and a["BTX - upcycling"]["mean"] == -1.0
    assert a["BTX - BTM"]["mean"] == pytest.approx(-0.5)
    assert a["claims_held"] == {"BTX beats dense on the average": 1}
    assert summary["rows"]["b"]["BTX - dense"] == {"mean": 1.0, "std": 0.0, "n": 1}
    table = format_table(summary)
    assert ("| a | 14.00 ± 0.00 | 12.00 ± 0.00 | 13.00 ± 0.00 | 12.50 ± 0.00 | 12.00 ± 1.41 | 0.00 ± 1.41 | "
            "-1.00 ± 1.41 | -0.50 ± 1.41 |") in table
    sweep.output.mkdir(parents=True)
    write_sweep_report(sweep, summary)
    text = (sweep.output / "sweep.md").read_text()
    assert "b-s2 failed" in text and (sweep.output / "btx_minus_dense_configuration.png").read_bytes()[:4] == b"\x89PNG"


def test_table_only_reads_finished_runs_and_trains_nothing(tmp_path, monkeypatch):
    import btx_megatron.experiment.sweep as sweep_mod

    def no_training(*args, **kwargs):
        raise AssertionError("--table-only must not build a pipeline")

    monkeypatch.setattr(sweep_mod, "load_pipeline", no_training)
    sweep = load_sweep(_sweep_file(tmp_path, seeds=[1, 2], configurations={"a": {}, "b": {}, "c": {}}))
    finished = {("a", 1): 11.0, ("a", 2): 13.0, ("b", 2): 12.0}
    for (name, seed), btx in finished.items():
        report = sweep.output / f"{name}-s{seed}" / "report"
        report.mkdir(parents=True)
        (report / "results.json").write_text(json.dumps(_result({"seed": 14.0, "dense": 12.0, "btx": btx})))
    summary = sweep_mod.run_sweep(sweep, table_only=True, echo=lambda *a: None)
    assert list(summary["rows"]) == ["a", "b"] and summary["not_run"] == ["b-s1", "c-s1", "c-s2"]
    assert summary["rows"]["a"]["seeds"] == [1, 2] and summary["rows"]["b"]["seeds"] == [2]
    assert summary["rows"]["a"]["BTX - dense"] == {"mean": 0.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    text = (sweep.output / "sweep.md").read_text()
    assert "| a | 14.00 ± 0.00 | 12.00 ± 0.00 | 12.00 ± 1.41 | 0.00 ± 1.41 | - | - | 2 |" in text
    assert "| b | 14.00 | 12.00 | 12.00 | 0.00 | - | - | 1 |" in text
    assert "not run yet: b-s1, c-s1, c-s2" in text


def test_own_expert_share_counts_split_experts_as_their_domain():
    routing = {"expert_names": ["math.0", "math.1", "code", "seed"], "domains": {
        "math": {"layers": {"1": {"token_fraction": [0.2, 0.2, 0.3, 0.3]}, "2": {"token_fraction": [0.3, 0.2, 0.2, 0.3]}}},
        "code": {"layers": {"1": {"token_fraction": [0.1, 0.1, 0.5, 0.3]}}},
        "wiki": {"layers": {"1": {"token_fraction": [0.25, 0.25, 0.25, 0.25]}}}}}
    share = own_expert_share(routing)
    assert share["math"] == {"1": pytest.approx(0.4), "2": pytest.approx(0.5), "mean": pytest.approx(0.45)}
    assert share["code"]["mean"] == pytest.approx(0.5) and "wiki" not in share


def test_report_gives_the_own_expert_share_per_layer_over_seeds(tmp_path):
    from btx_megatron.experiment.sweep import run_sweep

    sweep = load_sweep(_sweep_file(tmp_path, seeds=[1, 2], configurations={"top-2": {}}))
    for seed, (l1, l2) in {1: (0.4, 0.5), 2: (0.3, 0.1)}.items():
        report = sweep.output / f"top-2-s{seed}" / "report"
        (report / "routing").mkdir(parents=True)
        (report / "results.json").write_text(json.dumps(_result({"seed": 14.0, "dense": 12.0, "btx": 13.0})))
        (report / "routing" / "routing.json").write_text(json.dumps({"expert_names": ["math", "seed"], "domains": {
            "math": {"layers": {"1": {"token_fraction": [l1, 1 - l1]}, "10": {"token_fraction": [l2, 1 - l2]},
                                "2": {"token_fraction": [0.2, 0.8]}}}}}))
    run_sweep(sweep, table_only=True, echo=lambda *a: None)
    text = (sweep.output / "sweep.md").read_text()
    assert "| top-2 | 28.33 ± 11.79% |" in text  # mean over layers, then over seeds: 36.7% and 20%
    assert "| configuration | domain | layer 1 | layer 2 | layer 10 |" in text  # layers in numeric order
    assert "| top-2 | math | 35% | 20% | 30% |" in text


def test_branch_edge_is_each_branch_against_dense_on_its_own_domain(tmp_path):
    def result(btx, branch_ppl):
        domains = {"code": {"ppl": 10.0}, "math": {"ppl": 2.0}}
        own = {d: {"domains": {**domains, d: {"ppl": branch_ppl[d]}}, "average_ppl": 0.0} for d in domains}
        rows = {"dense": {"domains": domains, "average_ppl": 6.0}, "btx": {"domains": domains, "average_ppl": btx}, **own}
        return {"domains": ["code", "math"], "models": list(rows), "rows": list(rows.values())}

    # code branch 9.0 vs dense 10.0 (-10%), math branch 2.1 vs 2.0 (+5%): mean -2.5%.
    assert branch_edge(result(5.0, {"code": 9.0, "math": 2.1})) == pytest.approx(-2.5)
    assert branch_edge({"models": ["btx"], "rows": [{"average_ppl": 1.0}]}) is None
    sweep = load_sweep(_sweep_file(tmp_path, seeds=[1, 2], configurations={"a": {}}))
    summary = summarize(sweep, {"a": {1: result(5.0, {"code": 9.0, "math": 2.1}),
                                      2: result(5.0, {"code": 9.5, "math": 2.0})}}, {})
    edge = summary["rows"]["a"]["branch vs dense, own domain"]
    assert edge["mean"] == pytest.approx((-2.5 - 2.5) / 2) and edge["n"] == 2
    assert "| branch vs dense, own domain (%) | seeds |" in format_table(summary)
    assert "| -2.50 ± 0.00 | 2 |" in format_table(summary)


def test_configurations_that_change_one_factor_are_plotted_against_it(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, seeds=[1], base={"evaluation.eval_iters": 2}, configurations={
        "shipped": {}, "mix-600": {"mix.train_iters": 600}, "mix-300": {"mix.train_iters": 300},
        "long": {f"domains.{d}.train_iters": 500 for d in ("math", "code", "wiki")},
        "two": {"mix.train_iters": 300, "merge.router_init": "centroid"},           # two factors: no series
        "weights": {"merge.weights": {"seed": 0.5, "math": 0.5}},                   # not a scalar: no series
        "centroid": {"merge.router_init": "centroid"}}))                            # one value only: no plot
    base = yaml.safe_load(EXPERIMENT.read_text())
    mix_iters = base["mix"]["train_iters"]
    branch_iters = base["domains"][0]["train_iters"]
    series = one_factor_series(sweep, list(sweep.configurations))
    assert series == {"mix.train_iters": sorted([(mix_iters, "shipped"), (300, "mix-300"), (600, "mix-600")]),
                      "domains.*.train_iters": [(branch_iters, "shipped"), (500, "long")],
                      "merge.router_init": [(base["merge"]["router_init"], "shipped"), ("centroid", "centroid")]}
    # Without the unchanged configuration, one value per factor is no series.
    assert one_factor_series(sweep, ["mix-600", "long"]) == {}
    results = {name: {1: _result({"seed": 14.0, "dense": 12.0, "btx": 12.0 + i})} for i, name in enumerate(sweep.configurations)}
    sweep.output.mkdir(parents=True)
    write_sweep_report(sweep, summarize(sweep, results, {}))
    for png in ("configuration", "mix_train_iters", "domains_all_train_iters", "merge_router_init"):
        assert (sweep.output / f"btx_minus_dense_{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert "btx_minus_dense_mix_train_iters.png" in (sweep.output / "sweep.md").read_text()
