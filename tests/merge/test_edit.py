"""Expert edits of a BTX checkpoint (btx_megatron.merge.edit, tools/edit_experts.py): add a domain
expert, remove one, list them.

The BTX model is the merge tests' three-branch merge (``work`` fixture); the new domain is one
more tiny dense branch. Tensors are read back with PyTorch's own DCP reader
(:func:`merge_fixtures.read_dcp`); an edited model is trained at EP2 with ``pretrain_mix`` and
exported to Hugging Face Mixtral.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.merge.merge_fixtures import (DENSE_FC1, DENSE_FC2, FC1, FC2, L, ROUTER, TINY, as_fresh_tool_process, build,
                            iter_dir as _iter, load, logits_of, make_branch, moe_argv, parse, read_dcp,
                            reference_average, tokens as tokens_of, write_token_dataset)

NEW = "headers"
NORM = "decoder.layers.pre_mlp_layernorm.weight"


def add(load, output, branch, **kw):
    from btx_megatron.merge.edit import add_expert
    from btx_megatron.merge.edit_options import AddOptions

    kw.setdefault("progress", False)
    return add_expert(AddOptions(load=str(load), output=str(output), branch=(branch[0], str(branch[1])), **kw))


def remove(load, output, experts, **kw):
    from btx_megatron.merge.edit import remove_expert
    from btx_megatron.merge.edit_options import RemoveOptions

    kw.setdefault("progress", False)
    return remove_expert(RemoveOptions(load=str(load), output=str(output), experts=list(experts), **kw))


def manifest(root) -> dict:
    return json.loads((_iter(root) / "btx_checkpoint.json").read_text())


def cli():
    spec = importlib.util.spec_from_file_location("edit_experts", Path(__file__).parents[2] / "tools/edit_experts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def grown(work, tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    branch = make_branch(root / NEW, seed=7)
    added = add(work["merged"], root / "added", (NEW, branch))
    return {"root": root, "branch": branch, "added": added}


def test_add_then_remove_gives_back_the_original_bit_for_bit(work, grown, tmp_path):
    original, added = read_dcp(_iter(work["merged"])), read_dcp(_iter(grown["added"]))
    new = read_dcp(_iter(grown["branch"]))
    # The add: expert 3 is the new branch's FFN, experts 0-2 and every shared weight are the BTX
    # model's, the router keeps its rows and gains one.
    assert set(added) == set(original)
    assert torch.equal(added[FC1][:, :3], original[FC1]) and torch.equal(added[FC1][:, 3], new[DENSE_FC1])
    assert torch.equal(added[FC2][:, :3], original[FC2]) and torch.equal(added[FC2][:, 3], new[DENSE_FC2])
    assert added[ROUTER].shape == (L, 4, 64) and torch.equal(added[ROUTER][:, :3], original[ROUTER])
    assert 0.01 < float(added[ROUTER][:, 3].std()) < 0.03  # random: N(0, init_method_std)
    assert not any(torch.equal(added[ROUTER][l, 3], original[ROUTER][l, 0]) for l in range(L))
    for k in original:
        if k not in (FC1, FC2, ROUTER):
            assert torch.equal(added[k], original[k]), k
    # ... and the remove gives every original tensor back.
    removed = remove(grown["added"], tmp_path / "removed", [NEW])
    back = read_dcp(_iter(removed))
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)

    m = manifest(grown["added"])
    assert m["kind"] == "moe" and m["iteration"] == 0 and m["optimizer"]["saved"] is False
    assert m["model"]["num_experts"] == 4 and m["btx"]["recommended_topk"] == 2
    assert m["btx"]["expert_names"] == ["math", "code", "wiki", NEW]
    edit = m["btx"]["edits"][-1]
    assert edit["op"] == "add" and edit["names"] == [NEW] and edit["router_init"] == "random"
    assert edit["source"]["content_hash"].startswith("sha256-") and edit["source"]["iteration"] == 0
    from btx_megatron.checkpoint.verify import fingerprint

    assert edit["base"]["content_hash"] == fingerprint(_iter(work["merged"]))
    assert edit["base"]["checkpoint_dir"] == str(_iter(work["merged"]).resolve())
    assert edit["git_revision"] and edit["time"].endswith("+00:00")
    assert m["btx"]["sources"][-1]["name"] == NEW and m["btx"]["sources"][-1]["added_by_edit"]
    mr = manifest(removed)
    assert mr["btx"]["expert_names"] == ["math", "code", "wiki"] and mr["model"]["num_experts"] == 3
    assert [e["op"] for e in mr["btx"]["edits"]] == ["add", "remove"]
    assert [s["name"] for s in mr["btx"]["sources"]] == ["math", "code", "wiki"]
    assert mr["btx"]["edits"][-1]["removed_sources"][0]["name"] == NEW
    assert not list(tmp_path.glob(".staging-*")) and not list(grown["root"].glob(".staging-*"))


def test_blend_shared_weights(work, grown, tmp_path):
    w = 0.25
    out = read_dcp(_iter(add(work["merged"], tmp_path / "blend", (NEW, grown["branch"]), blend_shared=w)))
    btx, new = read_dcp(_iter(work["merged"])), read_dcp(_iter(grown["branch"]))
    blended = [k for k in btx if k not in (FC1, FC2, ROUTER)]
    assert len(blended) == 7
    for k in blended:
        dense_key = "decoder.layers.mlp.linear_fc1.layer_norm_weight" if k == NORM else k
        want = reference_average([btx[k], new[dense_key]], [1 - w, w], torch.float32)
        assert torch.equal(out[k], want), k
        assert not torch.equal(out[k], btx[k]), k
    assert torch.equal(out[FC1][:, :3], btx[FC1]) and torch.equal(out[FC1][:, 3], new[DENSE_FC1])
    assert manifest(tmp_path / "blend")["btx"]["edits"][-1]["blend_shared"] == w


def _mean_hidden_states(model_root, prefix: str, num_experts: int) -> torch.Tensor:
    """[L, H]: the mean pre-MLP-norm output (the router's input) of an MoE checkpoint on the 4
    samples the centroid computation draws from ``prefix``."""
    from btx_megatron.config.schema import DataConfig
    from btx_megatron.data.datasets import build_domain_eval_datasets
    from btx_megatron.data.tokenizers import build_tokenizer

    ds = build_domain_eval_datasets(DataConfig(eval_domains={"d": [prefix]}, tokenizer_type="NullTokenizer"),
                                    build_tokenizer("NullTokenizer", None, 200), seq_length=16, seed=1234,
                                    num_samples=4)["d"]
    moe = build(parse(moe_argv(num_experts, 2)))[0]
    load([moe], model_root)
    moe.eval()
    acts = {l: [] for l in range(L)}
    for l in range(L):
        moe.decoder.layers[l].pre_mlp_layernorm.register_forward_hook(
            lambda mod, inp, out, l=l: acts[l].append(out.reshape(-1, 64).double()))
    with torch.no_grad():
        for i in range(4):
            tok = torch.as_tensor(ds[i]["tokens"]).long().unsqueeze(0)
            moe(tok, torch.arange(tok.shape[1]).unsqueeze(0), None)
    return torch.stack([torch.cat(acts[l]).mean(0) for l in range(L)])


def test_centroid_row_is_the_btx_models_hidden_state_scaled_like_its_rows(work, grown, tmp_path):
    prefix = write_token_dataset(tmp_path / "new_data", seed=3, low=100)
    other = write_token_dataset(tmp_path / "old_data", seed=4, low=0)
    argv = ["add", "--load", str(work["merged"]), "--branch", f"{NEW}={grown['branch']}", "--output",
            str(tmp_path / "out"), "--router-init", "centroid", "--centroid-data", f"{NEW}={prefix}",
            "--tokenizer-type", "NullTokenizer", "--centroid-samples", "4", "--quiet"]
    assert cli().main(argv) == 0
    contrast = argv + ["--centroid-contrast", f"math={other}"]
    contrast[contrast.index("--output") + 1] = str(tmp_path / "contrast")
    assert cli().main(contrast) == 0
    info = manifest(tmp_path / "contrast")["btx"]["edits"][-1]["centroid"]
    assert info["tokens"] == {NEW: 64, "math": 64} and info["contrast"] == ["math"]
    # Reference: the mean pre-MLP-norm output of the BTX model itself on the same samples; the
    # row is that direction (minus the other domain's with --centroid-contrast), at the mean
    # norm of the layer's existing rows.
    new, old = (_mean_hidden_states(work["merged"], p, 3) for p in (prefix, other))
    original = read_dcp(_iter(work["merged"]))[ROUTER]
    for out, want in (("out", new), ("contrast", new - old)):
        router = read_dcp(_iter(tmp_path / out))[ROUTER]
        for l in range(L):
            cos = torch.nn.functional.cosine_similarity(router[l, 3].double(), want[l], dim=0)
            assert float(cos) > 1 - 1e-6, (out, l)
            torch.testing.assert_close(router[l, 3].double().norm(), original[l].double().norm(dim=-1).mean(),
                                       rtol=1e-6, atol=0)
    assert float(torch.nn.functional.cosine_similarity(new[0], new[0] - old[0], dim=0)) < 0.99  # they differ
    # Centroid without data for the new domain: refused, nothing written.
    bad = argv[:argv.index("--centroid-data")] + argv[argv.index("--tokenizer-type"):]
    bad[bad.index("--output") + 1] = str(tmp_path / "o2")
    assert cli().main(bad) == 2
    assert not (tmp_path / "o2").exists()


def test_bad_inputs_are_refused_and_leave_no_output(work, grown, tmp_path, capsys):
    merged = work["merged"]
    other = make_branch(tmp_path / "wide", seed=9, argv=[a if a != "96" else "128" for a in TINY])
    cases = [
        (lambda o: add(merged, o, ("law", other)), "architecture mismatch.*ffn_hidden_size=128.*ffn_hidden_size=96"),
        (lambda o: add(merged, o, ("code", grown["branch"])), "already has an expert or source named code"),
        (lambda o: add(merged, o, ("law", work["merged"])), "already an MoE checkpoint"),
        (lambda o: add(work["branches"][0][1], o, ("law", grown["branch"])), "is a dense checkpoint"),
        (lambda o: add(merged, o, (NEW, grown["branch"]), blend_shared=1.5), "--blend-shared 1.5 must be between"),
        (lambda o: add(merged, o, (NEW, grown["branch"]), expert_model_parallel_size=3),
         "4 experts, which do not divide over --expert-model-parallel-size 3"),
        (lambda o: remove(merged, o, ["math", "code", "wiki"]), "would remove the last expert"),
        (lambda o: remove(merged, o, ["math", "code"]), "1 expert\\(s\\), fewer than its top-k 2.*--moe-router-topk"),
        (lambda o: remove(merged, o, ["math"], expert_model_parallel_size=4),
         "2 experts, which do not divide over --expert-model-parallel-size 4"),
        (lambda o: remove(merged, o, ["law"]), "--expert law: .* has no such expert; its experts are math, code, wiki"),
        (lambda o: remove(merged, o, ["math"], topk=3), "--moe-router-topk 3 is larger than the 2 experts"),
    ]
    for i, (run, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(ValueError, match=message):
            run(out)
        assert not out.exists(), message
    assert not list(tmp_path.glob(".staging-*")) and not list(Path(merged).parent.glob(".staging-*"))
    # With a smaller top-k given for the result, the removal down to one expert is fine.
    one = remove(merged, tmp_path / "one", ["math", "code"], topk=1)
    m = manifest(one)
    assert m["model"]["num_experts"] == 1 and m["model"]["moe_router_topk"] == 1
    assert m["btx"]["recommended_topk"] == 1 and m["btx"]["expert_names"] == ["wiki"]
    assert torch.equal(read_dcp(_iter(one))[FC2][:, 0], read_dcp(_iter(merged))[FC2][:, 2])
    # The command line: one line naming the problem, exit status 2, nothing written.
    assert cli().main(["remove", "--load", str(merged), "--expert", "code", "--expert", "math", "--output",
                       str(tmp_path / "cli")]) == 2
    assert "edit_experts: error:" in capsys.readouterr().err and not (tmp_path / "cli").exists()


def test_split_experts_grow_by_c_and_shrink_by_source(work, grown, tmp_path):
    """A split-expert model (each FFN cut into C = 2 experts): the new branch becomes C experts cut
    exactly as the merge cuts it; removing the source's name removes all its chunks."""
    from tests.merge.merge_fixtures import merge

    split = merge(tmp_path / "split", work["branches"][:2], method="split", split=2)
    added = add(split, tmp_path / "added", (NEW, grown["branch"]))
    ref = read_dcp(_iter(merge(tmp_path / "ref", [(NEW, grown["branch"])], method="split", split=2)))
    out, before = read_dcp(_iter(added)), read_dcp(_iter(split))
    for key in (FC1, FC2):
        assert torch.equal(out[key][:, :4], before[key]) and torch.equal(out[key][:, 4:], ref[key]), key
    m = manifest(added)
    assert m["btx"]["expert_names"] == ["math.0", "math.1", "code.0", "code.1", f"{NEW}.0", f"{NEW}.1"]
    assert m["btx"]["recommended_topk"] == 4 and m["model"]["num_experts"] == 6
    back = read_dcp(_iter(remove(added, tmp_path / "back", [NEW])))
    assert set(back) == set(before) and all(torch.equal(back[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="after removing math.0, math.1 the model has 4 expert"):
        remove(added, tmp_path / "bad", ["math"], expert_model_parallel_size=3)


def test_list_shows_experts_sources_and_history(work, grown, capsys):
    assert cli().main(["list", "--load", str(grown["added"])]) == 0
    text = capsys.readouterr().out
    assert "4 experts, top-2, method btx" in text
    for name in ("math", "code", "wiki", NEW):
        assert f" {name} " in text
    assert f"add {NEW} from {_iter(grown['branch']).resolve()}" in text and "(added)" in text
    assert cli().main(["list", "--load", str(grown["added"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in info["experts"]] == ["math", "code", "wiki", NEW]
    assert info["experts"][3]["content_hash"] == manifest(grown["added"])["btx"]["edits"][0]["source"]["content_hash"]
    assert [e["op"] for e in info["edits"]] == ["add"]


def _edit_and_train_ep2(merged: str, branch: str, out: str) -> dict:
    """On 2 gloo ranks: the add with work split over both, then 2 steps of pretrain_mix at EP2
    training only the new expert and its router rows."""
    from btx_megatron import pretrain_mix
    from btx_megatron.merge.edit import add_expert
    from btx_megatron.merge.edit_options import AddOptions

    add_expert(AddOptions(load=merged, output=f"{out}/w2", branch=(NEW, branch), progress=False))
    argv = moe_argv(4, 2) + ["--mock-data", "--global-batch-size", "4", "--lr", "1e-2", "--lr-warmup-iters", "0",
                             "--train-iters", "2", "--eval-iters", "0", "--log-interval", "1", "--seed", "3",
                             "--expert-model-parallel-size", "2", "--train-experts", NEW, "--train-router",
                             "--load", f"{out}/w2", "--save", f"{out}/trained", "--save-interval", "2"]
    result = pretrain_mix.run(argv)
    return {"losses": result.losses, "iteration": result.iteration}


def test_distributed_add_trains_at_ep2_and_removes_back_to_the_original(work, grown, tmp_path):
    ranks = run_distributed(_edit_and_train_ep2, 2, str(work["merged"]), str(grown["branch"]), str(tmp_path))
    assert ranks[0]["iteration"] == 2 and all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)
    # The 2-process add wrote exactly the 1-process add's tensors, as two files.
    w1, w2 = read_dcp(_iter(grown["added"])), read_dcp(_iter(tmp_path / "w2"))
    assert set(w1) == set(w2) and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert sorted(p.name for p in _iter(tmp_path / "w2").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    trained_dir = tmp_path / "trained" / "iter_0000002"
    trained = read_dcp(trained_dir)
    assert json.loads((trained_dir / "btx_checkpoint.json").read_text())["layout"]["expert_model_parallel_size"] == 2
    assert not torch.equal(trained[FC1][:, 3], w1[FC1][:, 3]) and not torch.equal(trained[ROUTER][:, 3], w1[ROUTER][:, 3])
    # Remove the trained expert from the EP2 training checkpoint (optimizer state and all): the
    # original BTX model, bit for bit, since nothing else moved.
    back = read_dcp(_iter(remove(tmp_path / "trained", tmp_path / "back", [NEW])))
    original = read_dcp(_iter(work["merged"]))
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    # The history travels: the mix phase that trained the expert moves to mix_history (a later mix
    # phase records its own start), the expert training and both edits stay.
    btx = manifest(tmp_path / "back")["btx"]
    assert "mix" not in btx and btx["mix_history"][0]["started_from"] == str(_iter(tmp_path / "w2"))
    assert btx["expert_training"][0]["experts"] == [NEW] and [e["op"] for e in btx["edits"]] == ["add", "remove"]
    from btx_megatron.merge.edit_list import describe, format_description

    text = format_description(describe(str(tmp_path / "back")))
    assert f"  - {NEW} with their router rows, from {_iter(tmp_path / 'w2')}" in text
    assert "  1. add headers from" in text and "  2. remove headers; base " in text


def test_forked_workers_write_the_one_process_edit(work, grown, tmp_path, monkeypatch):
    """``--workers 2`` (two processes forked by the tool, btx_megatron.runtime.distributed.run_forked_group):
    the add and the remove write exactly the one-process tensors, as two files."""
    as_fresh_tool_process(monkeypatch)
    out = tmp_path / "w2"
    assert cli().main(["add", "--load", str(work["merged"]), "--branch", f"{NEW}={grown['branch']}",
                       "--output", str(out), "--workers", "2", "--quiet"]) == 0
    for got, want in [(out, grown["added"]), (remove(out, tmp_path / "back", [NEW], workers=2), work["merged"])]:
        a, b = read_dcp(_iter(want)), read_dcp(_iter(got))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), got
        assert sorted(p.name for p in _iter(got).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_edited_model_exports_to_mixtral_with_matching_logits(grown, tmp_path):
    transformers = pytest.importorskip("transformers")
    from btx_megatron.convert import export_hf

    out = export_hf(grown["added"], tmp_path / "hf", progress=False)
    model = build(parse(moe_argv(4, 2)))[0]
    load([model], grown["added"])
    tokens, positions = tokens_of(4)
    ours = logits_of(model, tokens, positions)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_local_experts == 4
    picked = []
    for layer in hf.model.layers:
        layer.mlp.gate.register_forward_hook(lambda mod, inp, result: picked.append(result[2]))
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert theirs.abs().max() > 0.1
    assert (ours[..., :theirs.shape[-1]] - theirs).abs().max().item() <= 1e-4
    # Some tokens are routed to the new expert in every layer: the comparison covers it.
    assert len(picked) == L and all(bool((p == 3).any()) for p in picked)
