"""The merge's results (btx_megatron.merge.writer): tensors on disk, functional equivalences in
Megatron-Core models, the distributed merge and loading at other layouts.

Branch checkpoints are tiny dense models with seed-dependent weights saved by the trainer's
``save_checkpoint``. The merged checkpoint is read back with PyTorch's own DCP reader
(:func:`merge_fixtures.read_dcp`) for the tensor checks, and loaded into Megatron-Core MoE
models (``load_model_weights``) for the functional ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.merge.merge_fixtures import (DENSE_FC1, DENSE_FC2, FC1, FC2, L, ROUTER, TINY, build, cast_checkpoint,
                            iter_dir as _iter, load, logits_of, make_branch, merge, moe_argv, parse, read_dcp,
                            reference_average, tokens)
from tests.dist_utils import run_distributed

# ---------------------------------------------------------------------------------------------
# Tensors on disk (PyTorch's reader)
# ---------------------------------------------------------------------------------------------


def test_experts_and_averages_bit_exact(work):
    srcs = [read_dcp(_iter(p)) for _, p in work["branches"]]
    out = read_dcp(_iter(work["merged"]))
    # Experts: branch i's FFN, bit for bit, in the order given.
    for i, src in enumerate(srcs):
        assert torch.equal(out[FC1][:, i], src[DENSE_FC1])
        assert torch.equal(out[FC2][:, i], src[DENSE_FC2])
    # Dense pre-MLP norm (stored with fc1 by TE) -> MoE pre_mlp_layernorm, averaged.
    mean = lambda k: torch.stack([s[k] for s in srcs]).double().mean(0).float()  # noqa: E731
    assert torch.equal(out["decoder.layers.pre_mlp_layernorm.weight"], mean("decoder.layers.mlp.linear_fc1.layer_norm_weight"))
    averaged = [k for k in srcs[0] if not k.startswith("decoder.layers.mlp.")]
    assert len(averaged) == 6  # embedding, output layer, qkv, proj, attention norm, final norm
    for k in averaged:
        assert torch.equal(out[k], mean(k)), k
        assert not torch.equal(out[k], srcs[0][k]), k  # the branches really differ
    expected = set(averaged) | {FC1, FC2, ROUTER, "decoder.layers.pre_mlp_layernorm.weight"}
    assert set(out) == expected
    # Router: new, [L, E, H], N(0, init_method_std).
    assert out[ROUTER].shape == (L, 3, 64)
    assert 0.015 < float(out[ROUTER].std()) < 0.025


def test_manifest_provenance(work):
    m = json.loads((_iter(work["merged"]) / "btx_checkpoint.json").read_text())
    assert m["kind"] == "moe" and m["iteration"] == 0 and m["optimizer"]["saved"] is False
    assert m["model"]["num_experts"] == 3 and m["model"]["ffn_hidden_size"] == 96
    btx = m["btx"]
    assert btx["expert_names"] == ["math", "code", "wiki"] and btx["method"] == "btx"
    assert btx["router_init"] == "random" and btx["averaging_weights"]["code"] == pytest.approx(1 / 3)
    hashes = [s["content_hash"] for s in btx["sources"]]
    assert len(set(hashes)) == 3 and all(h.startswith("sha256-sampled:") for h in hashes)
    assert [s["iteration"] for s in btx["sources"]] == [0, 0, 0]
    assert (work["merged"] / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert not list(work["root"].glob(".staging-*"))


def test_weighted_average(work, tmp_path):
    out = merge(tmp_path / "w", work["branches"], weights={"math": 3.0, "code": 1.0})
    srcs = [read_dcp(_iter(p)) for _, p in work["branches"]]
    got = read_dcp(_iter(out))
    k = "output_layer.weight"
    want = ((srcs[0][k].double() * 0.75 + srcs[1][k].double() * 0.25)).float()
    assert torch.equal(got[k], want)
    # The zero-weight branch still gives its expert.
    assert torch.equal(got[FC2][:, 2], srcs[2][DENSE_FC2])


@pytest.mark.parametrize("router_type", ["switch", "sample-top1"])
def test_a_top1_mix_router_is_recorded_so_the_merged_model_builds(work, tmp_path, router_type):
    """The merged model is evaluated before the mix phase from its own configuration: for a top-1
    mix it must carry the mix's router (Megatron-Core refuses a top-k router at top-1)."""
    from btx_megatron.eval.loading import ModelLoadOptions, build_eval_config
    from btx_megatron.models import transformer_config

    def config_of(path):
        manifest = json.loads((_iter(path) / "btx_checkpoint.json").read_text())
        return build_eval_config(manifest, ModelLoadOptions(), "NullTokenizer", None)

    out = merge(tmp_path / router_type, work["branches"], topk=1, router_type=router_type)
    cfg = config_of(out)
    assert (cfg.model.moe_router_type, cfg.model.moe_router_topk) == (router_type, 1)
    transformer_config(cfg)
    with pytest.raises(ValueError, match="moe-router-pre-softmax when topk is 1"):
        transformer_config(config_of(merge(tmp_path / "topk", work["branches"], topk=1)))
    # The tensors do not depend on it.
    assert torch.equal(read_dcp(_iter(out))[FC1], read_dcp(_iter(work["merged"]))[FC1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_bit_identical_to_reference_merge(work, tmp_path, dtype):
    """bf16 and fp32 sources, uniform and weighted: every averaged tensor is the whole-tensor
    float64 running sum of the merge as first written, every expert its branch's FFN, bit for bit.
    (The bf16 sources are whole-tensor chunks written by PyTorch's DCP writer, not Megatron's.)"""
    branches = work["branches"]
    if dtype != torch.float32:
        branches = [(n, cast_checkpoint(p, tmp_path / f"{n}-{dtype}", dtype)) for n, p in branches]
    srcs = [read_dcp(_iter(p)) for _, p in branches]
    for label, given, raw in [("uniform", None, [1.0, 1.0, 1.0]),
                              ("weighted", {"math": 0.7, "code": 0.2, "wiki": 0.1}, [0.7, 0.2, 0.1])]:
        out = read_dcp(_iter(merge(tmp_path / label, branches, weights=given)))
        for k in srcs[0]:
            if k in (DENSE_FC1, DENSE_FC2):
                for i, src in enumerate(srcs):
                    assert torch.equal(out[FC1 if k == DENSE_FC1 else FC2][:, i], src[k]), (label, k, i)
                continue
            okey = k.replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")
            want = reference_average([s[k] for s in srcs], raw, dtype)
            assert out[okey].dtype == dtype and torch.equal(out[okey], want), (label, k)


def test_output_dtype_and_sources_no_reader_can_address(work, tmp_path):
    """``dtype``: averages rounded once from the float64 sum into bf16, experts cast; and sources
    whose FFN and attention records are column-major (read through torch.load, experts read
    into a buffer instead of copied file to file) merge to the same tensors."""
    srcs = [read_dcp(_iter(p)) for _, p in work["branches"]]
    out = read_dcp(_iter(merge(tmp_path / "bf16", work["branches"], dtype="bfloat16")))
    for i, src in enumerate(srcs):
        assert torch.equal(out[FC2][:, i], src[DENSE_FC2].to(torch.bfloat16))
    k = "embedding.word_embeddings.weight"
    assert torch.equal(out[k], reference_average([s[k] for s in srcs], [1.0] * 3, torch.bfloat16))
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    strided = [(n, cast_checkpoint(p, tmp_path / f"strided-{n}", torch.float32, strided=(DENSE_FC2, qkv)))
               for n, p in work["branches"]]
    a, b = read_dcp(_iter(work["merged"])), read_dcp(_iter(merge(tmp_path / "from_strided", strided)))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_plain_process_needs_no_process_group_and_no_megatron(work, tmp_path):
    """``python tools/merge_branches.py`` as one plain process: no sys.path tricks (the package is
    installed), no process group, neither Megatron-Core nor PyTorch DCP imported (start-up), the
    process ends right after its work (exit code 0), same tensors as the in-process merge."""
    tool = Path(__file__).resolve().parents[2] / "tools" / "merge_branches.py"
    argv = [a for n, p in work["branches"] for a in ("--branch", f"{n}={p}")] + ["--output", str(tmp_path / "cli")]
    # The tool ends with exit_now (atexit handlers, then no interpreter teardown): the check runs
    # as an atexit handler, after the tool's own work, and the exit code is the process's.
    code = ("import atexit, runpy, sys\n"
            "def report():\n"
            "    import torch\n"
            "    print('RESULT', any(m.startswith('megatron') for m in sys.modules), torch.distributed.is_initialized(),\n"
            "          'torch.distributed.checkpoint' in sys.modules, flush=True)\n"
            "atexit.register(report)\n"
            f"sys.argv = {[str(tool)] + argv!r}\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "print('NOT REACHED', flush=True)")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "RESULT False False False", \
        done.stdout[-500:] + done.stderr[-2000:]
    assert "[merge] read" in done.stderr and "MiB/s" in done.stderr
    a, b = read_dcp(_iter(work["merged"])), read_dcp(_iter(tmp_path / "cli"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Functional equivalences in Megatron-Core models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,topk", [(2, 2), (3, 2), (3, 3)])
def test_copies_of_one_dense_model_give_dense_logits(work, tmp_path, n, topk):
    name, path = work["branches"][0]
    merged = merge(tmp_path / "copies", [(f"c{i}", path) for i in range(n)], allow_duplicates=True)
    tok, pos = tokens()
    dense = build(parse(TINY))[0]
    load([dense], path)
    want = logits_of(dense, tok, pos)
    moe = build(parse(moe_argv(n, topk)))[0]
    load([moe], merged)
    torch.testing.assert_close(logits_of(moe, tok, pos), want, rtol=1e-5, atol=1e-5)


def test_upcycle_copies_give_dense_logits_and_noise(work, tmp_path):
    _, path = work["branches"][1]
    merged = merge(tmp_path / "up", upcycle_from=str(path), num_experts=4)
    tok, pos = tokens(1)
    dense = build(parse(TINY))[0]
    load([dense], path)
    moe = build(parse(moe_argv(4, 2)))[0]
    load([moe], merged)
    torch.testing.assert_close(logits_of(moe, tok, pos), logits_of(dense, tok, pos), rtol=1e-5, atol=1e-5)
    m = json.loads((_iter(merged) / "btx_checkpoint.json").read_text())
    assert m["btx"]["method"] == "upcycle" and m["model"]["num_experts"] == 4
    noisy = read_dcp(_iter(merge(tmp_path / "upn", upcycle_from=str(path), num_experts=2, upcycle_noise=0.01)))
    src = read_dcp(_iter(path))
    diff = noisy[FC1][:, 0] - src[DENSE_FC1]
    assert 0 < float(diff.std()) < 0.05 * float(src[DENSE_FC1].std())
    assert not torch.equal(noisy[FC1][:, 0], noisy[FC1][:, 1])


def _force_router(mlp, chosen: list[int], num_experts: int):
    """Replace the router's decision: every token goes to ``chosen`` at equal weight."""

    def forward(x, padding_mask=None):
        t = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
        probs = torch.zeros(t, num_experts, dtype=torch.float32)
        probs[:, chosen] = 1.0 / len(chosen)
        return probs, probs > 0

    mlp.router.forward = forward


@torch.no_grad()
def _layer_outputs(dense, moe, chosen, num_experts, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 2, 64, generator=g)
    pairs = []
    for l in range(L):
        _force_router(moe.decoder.layers[l].mlp, chosen, num_experts)
        got = moe.decoder.layers[l].mlp(x)[0]
        want = dense.decoder.layers[l].mlp(x)[0]
        pairs.append((got, want))
    return pairs


def test_router_forced_to_expert_gives_branch_ffn(work):
    moe = build(parse(moe_argv(3, 2)))[0]
    load([moe], work["merged"])
    moe.eval()
    for i, (_, path) in enumerate(work["branches"]):
        dense = build(parse(TINY))[0]
        load([dense], path)
        for got, want in _layer_outputs(dense, moe, [i], 3):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # ... and not some other branch's FFN
        dense_other = build(parse(TINY))[0]
        load([dense_other], work["branches"][(i + 1) % 3][1])
        got, wrong = _layer_outputs(dense_other, moe, [i], 3)[0]
        assert not torch.allclose(got, wrong, atol=1e-3)


@pytest.mark.parametrize("scale", ["exact", "megatron"])
def test_split_experts_equal_weight_gives_branch_ffn(work, tmp_path, scale):
    c = 2
    merged = merge(tmp_path / "split", work["branches"][:2], method="split", split=c, split_scale=scale)
    m = json.loads((_iter(merged) / "btx_checkpoint.json").read_text())
    assert m["model"]["num_experts"] == 4 and m["model"]["moe_ffn_hidden_size"] == 48
    assert m["btx"]["expert_names"] == ["math.0", "math.1", "code.0", "code.1"]
    assert m["btx"]["recommended_topk"] == 4 and m["btx"]["split_scale"] == scale
    # On disk: chunk j of branch i = gate rows j and the matching up rows (fc2 scaled by C).
    src = read_dcp(_iter(work["branches"][1][1]))
    out = read_dcp(_iter(merged))
    gate, up = src[DENSE_FC1].chunk(2, dim=1)
    s1, s2 = m["btx"]["split_scales_applied"]
    for j in range(c):
        want1 = torch.cat([gate.chunk(c, 1)[j], up.chunk(c, 1)[j]], dim=1)
        want2 = src[DENSE_FC2].chunk(c, 2)[j]
        assert torch.equal(out[FC1][:, 2 + j], want1 if s1 == 1.0 else (want1 * s1))
        assert torch.equal(out[FC2][:, 2 + j], want2 * s2)
    moe = build(parse(moe_argv(4, 2, ["--moe-ffn-hidden-size", "48"])))[0]
    load([moe], merged)
    moe.eval()
    dense = build(parse(TINY))[0]
    load([dense], work["branches"][1][1])
    for got, want in _layer_outputs(dense, moe, [2, 3], 4):
        if scale == "exact":
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            # Megatron's variance-preserving scale is not an identity through silu.
            assert not torch.allclose(got, want, atol=1e-4)


def test_blend_experts_layout(work, tmp_path):
    merged = merge(tmp_path / "blend", work["branches"], method="blend")
    out = read_dcp(_iter(merged))
    srcs = [read_dcp(_iter(p)) for _, p in work["branches"]]
    n, f = 3, 96
    w = f // n
    for e in range(n):
        for d in range(n):
            gate, up = srcs[d][DENSE_FC1].chunk(2, dim=1)
            assert torch.equal(out[FC1][:, e, d * w:(d + 1) * w], gate[:, e * w:(e + 1) * w])
            assert torch.equal(out[FC1][:, e, f + d * w:f + (d + 1) * w], up[:, e * w:(e + 1) * w])
            assert torch.equal(out[FC2][:, e, :, d * w:(d + 1) * w], srcs[d][DENSE_FC2][:, :, e * w:(e + 1) * w])


def test_seed_expert_is_last_and_not_averaged(work, tmp_path):
    seed = make_branch(tmp_path / "seed", seed=99)
    merged = merge(tmp_path / "ws", work["branches"][:2], seed_expert=str(seed))
    out = read_dcp(_iter(merged))
    srcs = [read_dcp(_iter(p)) for _, p in work["branches"][:2]]
    assert torch.equal(out[FC1][:, 2], read_dcp(_iter(seed))[DENSE_FC1])
    k = "embedding.word_embeddings.weight"
    assert torch.equal(out[k], torch.stack([s[k] for s in srcs]).double().mean(0).float())
    names = json.loads((_iter(merged) / "btx_checkpoint.json").read_text())["btx"]["expert_names"]
    assert names == ["math", "code", "seed"]


# ---------------------------------------------------------------------------------------------
# Distributed merge and loading at other layouts (2 gloo ranks)
# ---------------------------------------------------------------------------------------------


def _dist_worker(branches, seed, out_dir, argv_moe):
    """Merge at W=2, then load the W=1 merge at TP2+SP, EP2 and PP2 and return full logits."""
    import resource

    import torch

    from btx_megatron.merge import MergeOptions, run_merge
    from btx_megatron.runtime.distributed import initialize_distributed
    from megatron.core import parallel_state as ps

    cfg0 = parse(argv_moe)
    initialize_distributed(cfg0.parallel, seed=1)
    run_merge(MergeOptions(branches=branches, seed_expert=seed, output=str(Path(out_dir) / "w2"), progress=False))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    merged = str(Path(out_dir) / "w1")
    tok, pos = tokens()
    results = {}
    for name, extra in [("tp2sp", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                        ("ep2", ["--expert-model-parallel-size", "2"]),
                        ("pp2", ["--pipeline-model-parallel-size", "2"])]:
        cfg = parse(argv_moe + extra)
        model = build(cfg)[0]
        load([model], merged)
        model.eval()
        with torch.no_grad():
            if name == "pp2":
                if ps.is_pipeline_first_stage():
                    hidden = model(tok, pos, None)
                    torch.distributed.send(hidden.contiguous(), dst=1)
                    out = None
                else:
                    hidden = torch.empty(16, 2, 64)
                    torch.distributed.recv(hidden, src=0)
                    model.set_input_tensor(hidden)
                    out = model(tok, pos, None)
            else:
                out = model(tok, pos, None)
                if name == "tp2sp":  # vocab-parallel logits
                    parts = [torch.empty_like(out) for _ in range(2)]
                    torch.distributed.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
                    out = torch.cat(parts, dim=-1)
        results[name] = out
    return {"logits": results, "rss_kb": rss}


def test_distributed_merge_and_layouts(work, tmp_path):
    # Four experts (three branches + the seed) so that EP2 divides them.
    seed = make_branch(tmp_path / "seed", seed=42)
    opts = dict(branches=work["branches"], seed_expert=str(seed))
    merge(tmp_path / "w1", **opts)
    branches = [(n, str(p)) for n, p in work["branches"]]
    argv = moe_argv(4, 2)
    ranks = run_distributed(_dist_worker, 2, branches, str(seed), str(tmp_path), argv)
    # W=2 writes exactly the W=1 tensors.
    a, b = read_dcp(_iter(tmp_path / "w1")), read_dcp(_iter(tmp_path / "w2"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    tok, pos = tokens()
    ref = build(parse(argv))[0]
    load([ref], tmp_path / "w1")
    want = logits_of(ref, tok, pos)
    for rank, r in enumerate(ranks):
        for name, got in r["logits"].items():
            if got is None:
                continue
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name} rank {rank}")
    assert ranks[1]["logits"]["pp2"] is not None


