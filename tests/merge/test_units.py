"""Work units of the merge (btx_megatron.merge.units): the parts tile every output tensor exactly
once, how they are cut is invisible to readers (PyTorch's and Megatron-Core's), and W processes
get even shares of the bytes, so none holds a whole branch model."""

from __future__ import annotations

import math

import torch

from tests.merge.merge_fixtures import L, build, iter_dir, load, logits_of, merge, moe_argv, parse, read_dcp, tokens


def _units(work, monkeypatch, part_bytes: int):
    from btx_megatron.merge import ExpertPlan, build_units, inspect_source
    from btx_megatron.merge import units as units_mod

    monkeypatch.setattr(units_mod, "PART_BYTES", part_bytes)
    src = inspect_source("math", str(work["branches"][0][1]), "--branch")
    return build_units(src, ExpertPlan(num_sources=3), num_layers=L, num_experts=3, hidden=64)


def test_parts_tile_every_output_tensor_once(work, monkeypatch):
    units = _units(work, monkeypatch, 10_000)  # cuts the 64 KiB embedding and output layer into rows
    painted: dict[str, torch.Tensor] = {}
    for u in units:
        canvas = painted.setdefault(u.out_key, torch.zeros(u.global_shape, dtype=torch.int32))
        one_layer = (1,) if u.layer is not None else ()
        canvas[tuple(slice(o, o + s) for o, s in zip(u.offsets(), one_layer + u.shape))] += 1
    assert all(bool((c == 1).all()) for c in painted.values())
    emb = [u for u in units if u.out_key == "embedding.word_embeddings.weight"]
    assert len(emb) == math.ceil(256 / (10_000 // (64 * 4))) and all(u.nbytes <= 10_000 for u in emb)
    # A BTX expert part reads only its own branch; an averaged part every weighted branch.
    fc1 = [u for u in units if u.kind == "fc1_weight" and u.layer == 0]
    assert [u.source for u in fc1] == [0, 1, 2] and [u.reads(1.0, 1) for u in fc1] == [False, True, False]


def test_cut_is_invisible_to_readers(work, tmp_path, monkeypatch):
    from btx_megatron.merge import units as units_mod

    monkeypatch.setattr(units_mod, "PART_BYTES", 10_000)
    small = merge(tmp_path / "small_parts", work["branches"])
    a, b = read_dcp(iter_dir(work["merged"])), read_dcp(iter_dir(small))
    router = "decoder.layers.mlp.router.weight"
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if k != router)
    tok, pos = tokens(4)
    ref = build(parse(moe_argv(3, 2)))[0]
    load([ref], work["merged"])
    cut = build(parse(moe_argv(3, 2)))[0]
    load([cut], small)
    torch.testing.assert_close(logits_of(cut, tok, pos), logits_of(ref, tok, pos), rtol=0, atol=0)


def test_work_is_shared_evenly(work, monkeypatch):
    from btx_megatron.merge import assign_units
    from btx_megatron.merge.units import unit_cost

    units = _units(work, monkeypatch, 10_000)
    weights = [1.0, 1.0, 0.0]
    costs = [unit_cost(u, weights) for u in units]
    avg = next(u for u in units if u.kind == "avg" and u.layer == 0)
    assert unit_cost(avg, weights) == 3 * avg.nbytes  # its output and two weighted sources
    expert = next(u for u in units if u.kind == "fc2_weight")
    assert unit_cost(expert, weights) == 2 * expert.nbytes  # its output and its one source
    for world in (2, 4):
        owner = assign_units(units, world, costs)
        total, biggest = sum(costs), max(costs)
        for r in range(world):
            share = sum(c for c, o in zip(costs, owner) if o == r)
            assert share <= total / world + biggest, (world, r, share, total)
