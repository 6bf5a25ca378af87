"""BTX routers under expert parallelism: an EP=2 MoE layer (2 gloo ranks, 2 experts each, the
allgather dispatcher) equals the explicit computation with all four experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tests.dist_utils import run_distributed

E = 4


def _expert_weights(e: int, fc1_shape, fc2_shape):
    generator = torch.Generator().manual_seed(100 + e)
    return 0.1 * torch.randn(fc1_shape, generator=generator), 0.1 * torch.randn(fc2_shape, generator=generator)


def _moe_output_at_ep2(router_type: str):
    from megatron.core import parallel_state
    from tests.models.router_setup import build_model

    from btx_megatron.models.routers import routing_statistics

    model, _, _ = build_model(router_type, "--expert-model-parallel-size 2")
    moe = model.decoder.layers[1].mlp.eval()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    experts = moe.experts.local_experts
    assert len(experts) == 2
    fc1_shape, fc2_shape = experts[0].linear_fc1.weight.shape, experts[0].linear_fc2.weight.shape
    with torch.no_grad():
        for j, expert in enumerate(experts):  # global expert index = ep_rank * 2 + j
            fc1, fc2 = _expert_weights(ep_rank * 2 + j, fc1_shape, fc2_shape)
            expert.linear_fc1.weight.copy_(fc1)
            expert.linear_fc2.weight.copy_(fc2)
        moe.router.weight.copy_(torch.randn(E, 64, generator=torch.Generator().manual_seed(9)))
        rank = torch.distributed.get_rank()
        x = torch.randn(8, 2, 64, generator=torch.Generator().manual_seed(rank))  # different tokens per rank
        out, _ = moe(x)

        # The reference: every expert by hand, weights as the router's rule says.
        x_TH = x.reshape(-1, 64)
        logits = x_TH @ moe.router.weight.t()
        if router_type == "soft":
            gates = torch.softmax(logits, -1)
        else:  # topk, k = 2: softmax over the two selected logits
            top, idx = logits.topk(2, -1)
            gates = torch.zeros_like(logits).scatter(1, idx, torch.softmax(top, -1))
        manual = torch.zeros_like(x_TH)
        for e in range(E):
            fc1, fc2 = _expert_weights(e, fc1_shape, fc2_shape)
            gate, up = (x_TH @ fc1.t()).chunk(2, -1)
            manual += gates[:, e : e + 1] * ((F.silu(gate) * up) @ fc2.t())
        stats = routing_statistics(model)  # summed over both ranks' tokens
    return (out.reshape(-1, 64) - manual).abs().max().item(), stats[2]["tokens"], stats[2]["token_fraction"]


def _worker(router_types):
    # Both router types in one pair of processes: spawning gloo ranks costs most of the time.
    return {router_type: _moe_output_at_ep2(router_type) for router_type in router_types}


def test_moe_layer_at_ep2_equals_all_experts_by_hand():
    router_types = ("soft", "topk")
    results = run_distributed(_worker, 2, router_types)
    for router_type in router_types:
        for rank_results in results:
            max_error, tokens, fractions = rank_results[router_type]
            assert max_error < 1e-5, router_type
            assert tokens == 32, router_type  # 16 tokens on each of the two ranks
            assert abs(sum(fractions) - 1.0) < 1e-12
        # reduced statistics agree across ranks
        assert results[0][router_type][2] == results[1][router_type][2]
