"""BTM routing arithmetic (tf-idf profiles, causal similarities, mixture) and the results report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from btx_megatron.eval import btm
from btx_megatron.eval.report import (ResultRow, perplexity_changes, plot_loss_curves, plot_perplexities,
                                      read_train_curve, reference_row, training_cost, write_report)


def _profiles(seed: int = 0, vocab: int = 60):
    g = torch.Generator().manual_seed(seed)
    # Three "branches" drawing from different thirds of the vocabulary (plus shared ids 0..4).
    seqs = {}
    for b, name in enumerate(("math", "code", "wiki")):
        own = torch.randint(5 + 15 * b, 5 + 15 * (b + 1), (20, 16), generator=g)
        shared = torch.randint(0, 5, (20, 16), generator=g)
        seqs[name] = torch.where(torch.rand(20, 16, generator=g) < 0.7, own, shared)
    return btm.build_profiles(seqs, vocab), seqs


def test_idf_and_profiles():
    prof, seqs = _profiles()
    # ids 0..4 occur in (almost) every document: lowest IDF; never-seen ids: the maximum.
    assert prof.idf[:5].max() < prof.idf[5:50].min()
    assert prof.idf[55] == pytest.approx(math.log(61) + 1)  # 60 documents, id 55 in none
    assert (prof.profiles[:, 50:] == 0).all()
    assert torch.allclose(prof.profiles.norm(dim=1), torch.ones(3, dtype=torch.float64))
    # A branch's own text is closest to its own profile.
    for b, name in enumerate(prof.names):
        assert int(prof.similarity(seqs[name][0]).argmax()) == b


def test_causal_similarities_equal_prefix_by_prefix_computation():
    prof, _ = _profiles()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (3, 12), generator=g)
    sims = btm.context_similarities(tokens, prof, "causal")
    for i in range(3):
        for t in range(12):
            assert torch.allclose(sims[i, t], prof.similarity(tokens[i, : t + 1]), atol=1e-12, rtol=0)
    prefix = btm.context_similarities(tokens, prof, "prefix", 0.5)
    for i in range(3):
        assert torch.equal(prefix[i], prof.similarity(tokens[i, :6]).expand(12, 3))


@pytest.mark.parametrize("weighting", btm.WEIGHTINGS)
def test_mixture_weights_keep_topk(weighting):
    sims = torch.tensor([[0.1, 0.5, 0.3, 0.2], [0.9, 0.0, 0.8, 0.7]], dtype=torch.float64)
    w = btm.mixture_weights(sims, 2, weighting, temperature=0.1)
    assert torch.allclose(w.sum(-1), torch.ones(2, dtype=torch.float64))
    assert (w > 0).sum(-1).tolist() == [2, 2]
    assert w[0, 1] > 0 and w[0, 2] > 0 and w[1, 0] > 0 and w[1, 2] > 0
    if weighting == "softmax":
        assert w[0, 1] / w[0, 2] == pytest.approx(math.exp((0.5 - 0.3) / 0.1))
    if weighting == "normalized":
        assert w[0, 1] == pytest.approx(0.5 / 0.8)


def test_ensemble_equals_log_mean_probability_and_topk1_is_selection():
    g = torch.Generator().manual_seed(2)
    losses = torch.rand(3, 4, 5, generator=g, dtype=torch.float64) * 5
    uniform = torch.full((4, 5, 3), 1 / 3, dtype=torch.float64)
    expected = -torch.log(torch.exp(-losses).mean(0))
    assert torch.allclose(btm.ensemble_losses(losses, uniform), expected, atol=1e-12, rtol=0)
    sims = torch.rand(4, 5, 3, generator=g, dtype=torch.float64)
    one = btm.mixture_weights(sims, 1)
    picked = losses.permute(1, 2, 0).gather(-1, sims.argmax(-1, keepdim=True))[..., 0]
    assert torch.equal(btm.ensemble_losses(losses, one), picked)


def test_tfidf_sanity_on_builtin_corpora(corpora):
    """Real corpora: a math text is closest to the math branch, and so are held-out math sequences."""
    from btx_megatron.config import Config
    from btx_megatron.data import build_domain_eval_datasets, build_tokenizer
    from tests.eval.eval_helpers import DOMAINS, domain_prefixes, tokenizer_flags

    tok = tokenizer_flags(corpora)
    cfg = Config.from_dict({"model": {"vocab_size": 1000, "seq_length": 64}, "train": {"seed": 1234}, "data": tok})
    tokenizer = build_tokenizer(tok["tokenizer_type"], tok["tokenizer_model"], 1000)
    samples = btm.sample_training_sequences(domain_prefixes(corpora, "train"), cfg, tokenizer, 128)
    assert {k: tuple(v.shape) for k, v in samples.items()} == {d: (128, 64) for d in DOMAINS}
    prof = btm.build_profiles(samples, 1000)
    text = ("Let x be a real number such that 3x + 5 = 17. Solve for x, then compute x^2 - 4 "
            "and the sum of the first n terms of the sequence a_n = 2n + 1.")
    sims = prof.similarity(torch.tensor(tokenizer.tokenize(text)))
    assert prof.names[int(sims.argmax())] == "math", dict(zip(prof.names, sims.tolist()))
    cfg.data.eval_domains = domain_prefixes(corpora)
    valid = build_domain_eval_datasets(cfg.data, tokenizer, seq_length=64, seed=1, num_samples=None)
    fractions = {}
    for d in DOMAINS:
        tokens = torch.stack([torch.as_tensor(valid[d][i]["tokens"]) for i in range(len(valid[d]))])
        top = btm.context_similarities(tokens, prof, "prefix", 1.0)[:, 0].argmax(-1)
        fractions[d] = float((top == prof.names.index(d)).double().mean())
    print(fractions)
    # At this scale code's held-out split is one document unlike its three training files, so
    # only math (many small documents) is asserted.
    assert fractions["math"] > 0.9, fractions


def _fake_metrics(path, losses, tokens_per_iter=1024, resumed_at=None):
    lines = []
    for i, loss in enumerate(losses, start=1):
        lines.append({"type": "train", "iteration": i, "loss": loss, "tokens": i * tokens_per_iter, "lr": 1e-3})
        if i % 2 == 0:
            lines.append({"type": "eval", "iteration": i, "math": {"loss": loss + 0.1, "ppl": math.exp(loss + 0.1)}})
    text = "\n".join(json.dumps(x) for x in lines) + "\n"
    if resumed_at:  # a requeued run repeats iterations after its last checkpoint
        text += json.dumps({"type": "train", "iteration": resumed_at, "loss": 99.0, "tokens": resumed_at * tokens_per_iter}) + "\n"
        text += json.dumps({"type": "train", "iteration": resumed_at, "loss": losses[resumed_at - 1], "tokens": resumed_at * tokens_per_iter}) + "\n"
    text += '{"type": "train", "iteration": 9'  # cut short by a kill
    path.write_text(text)
    return path


def _row(name, kind, base, tokens=1e6, flops=2e12):
    return ResultRow(name, kind, {d: {"loss": base + i * 0.1, "ppl": math.exp(base + i * 0.1), "tokens": 512}
                                  for i, d in enumerate(("code", "math", "wiki"))}, tokens, flops)


def test_report_table_json_and_pngs(tmp_path, capsys):
    stages = {"seed": _fake_metrics(tmp_path / "seed.jsonl", [5.0, 4.0, 3.5, 3.2]),
              "branch math": _fake_metrics(tmp_path / "math.jsonl", [3.2, 3.0, 2.9], resumed_at=2)}
    assert read_train_curve(stages["branch math"]) == ([1024, 2048, 3072], [3.2, 3.0, 2.9])
    routing = tmp_path / "routing"
    routing.mkdir()
    (routing / "routing_math.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    rows = [_row("seed", "seed", 3.0), _row("branch math", "branch", 2.5), _row("dense", "dense", 2.8),
            _row("sparse upcycling", "upcycling", 2.7), _row("BTM (top-2)", "btm", 2.6),
            _row("BTX (top-2)", "btx", 2.4, tokens=3e6, flops=6.5e12)]
    paths = write_report(rows, tmp_path / "report", stage_metrics=stages, routing_dir=routing,
                         stage_offsets={"branch math": 4096})
    for key in ("perplexity_png", "loss_curves_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 1000
    data = json.loads(paths["json"].read_text())
    assert data["domains"] == ["code", "math", "wiki"]
    assert [r["name"] for r in data["rows"]] == [r.name for r in rows]
    for r in data["rows"]:
        assert all(math.isfinite(v["ppl"]) for v in r["domains"].values()) and math.isfinite(r["average_ppl"])
    btx = data["rows"][-1]
    assert btx["average_ppl"] == pytest.approx(sum(math.exp(2.4 + i * 0.1) for i in range(3)) / 3)
    md = paths["markdown"].read_text()
    assert "| BTX (top-2) | **11.02** | **12.18** | **13.46** | **12.22** | 3.00M | 6.50T |" in md
    assert "routing_math.png" in md and "loss_curves.png" in md
    printed = capsys.readouterr().out
    assert "BTX (top-2)" in printed and "12.22" in printed


def test_training_cost_sums_summaries(tmp_path):
    for name, tokens, flops in (("seed", 100, 1e9), ("math", 50, 5e8)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval_summary.json").write_text(json.dumps({"tokens": tokens, "flops": flops}))
    assert training_cost([tmp_path / "seed", tmp_path / "math"]) == (150.0, 1.5e9)
    with pytest.raises(ValueError, match="eval_summary.json"):
        training_cost([tmp_path / "missing"])


def test_loss_curves_reject_empty(tmp_path):
    (tmp_path / "m.jsonl").write_text("")
    with pytest.raises(ValueError, match="no training records"):
        plot_loss_curves({"seed": tmp_path / "m.jsonl"}, tmp_path / "x.png")


def test_perplexity_figure_shows_changes_relative_to_the_seed(tmp_path):
    seed = ResultRow("seed", "seed", {"code": {"ppl": 20.0}, "math": {"ppl": 2.0}})
    btx = ResultRow("BTX", "btx", {"code": {"ppl": 19.0}, "math": {"ppl": 1.9}})
    branch = ResultRow("branch math", "branch", {"code": {"ppl": 60.0}, "math": {"ppl": 1.8}})
    rows = [branch, seed, btx]
    assert reference_row(rows) is seed                     # the seed row, wherever it is
    assert reference_row(rows, "BTX") is btx
    with pytest.raises(ValueError, match="'nope' is not among the rows"):
        reference_row(rows, "nope")
    assert reference_row([btx, branch]) is btx             # no seed row: the first
    changes = perplexity_changes(rows, ["code", "math"], seed)
    # A 5% gain on math (ppl near 2) reads the same as a 5% gain on code (ppl near 20).
    assert changes[2] == pytest.approx([-5.0, -5.0, -5.0])
    assert changes[0] == pytest.approx([200.0, -10.0, 100.0 * (30.9 / 11.0 - 1.0)])
    assert changes[1] == pytest.approx([0.0, 0.0, 0.0])
    partial = ResultRow("partial", "other", {"code": {"ppl": 10.0}})
    assert perplexity_changes([partial], ["code", "math"], seed) == [[pytest.approx(-50.0), None, None]]
    png = plot_perplexities([*rows, partial], tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
