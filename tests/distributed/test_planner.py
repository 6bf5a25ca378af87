"""The --dry-run planner's figures against the real thing.

- Parameters: ``models.accounting`` per rank equals ``sum(p.numel())`` of the model chunks Megatron
  builds on that rank, dense and expert parameters separately, for dense/MoE x TP/PP/VP/EP layouts.
- FLOPs: the accounting's matmul FLOPs equal ``torch.utils.flop_counter.FlopCounterMode`` on a
  forward + backward of the built local-spec model. What is compared: every ``aten.mm`` (all
  projections, experts, router, output layer; counted 3x: forward, input grad, weight grad)
  against ``3 * linear``, and the unfused attention's ``aten.bmm``/``aten.baddbmm`` (QK^T and PV)
  against ``3 * attention`` with the full (non-causal) score matrix. The training FLOPs the
  trainer reports count the causal half of the score matrix (what a causal kernel computes).
- Memory: the estimate of ``training.memory`` is within 20% of the peak measured on CPU. Measured
  per process with the PyTorch profiler's CPU allocator events (``profile_memory=True``): the
  largest ``total_allocated`` of tensors allocated while building the model, DDP and optimizer
  and running two training steps (the second one with Adam's state), minus what was allocated
  when the window opened. That is weights + gradient buffer + optimizer state + activations and
  transients, without Python, library code or allocator caching.
"""

from __future__ import annotations

import gc
import os

import pytest

from tests.dist_utils import run_distributed

MODEL = (
    "--num-layers 4 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --num-query-groups 2 "
    "--seq-length 32 --vocab-size 250 --make-vocab-size-divisible-by 64 --swiglu --normalization RMSNorm "
    "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear "
    "--transformer-impl local"
).split()
MOE = ["--num-experts", "4", "--moe-router-topk", "2"]
TIED_LAYERNORM_BIAS = [a for a in MODEL if a not in ("--untie-embeddings-and-output-weights", "--disable-bias-linear")] + [
    "--normalization", "LayerNorm", "--position-embedding-type", "learned_absolute"]

# World 2: parameter layouts.
PARAM_LAYOUTS = {
    "dense-tp2": MODEL + ["--tensor-model-parallel-size", "2"],
    "dense-tied-layernorm-bias-pp2": TIED_LAYERNORM_BIAS + ["--pipeline-model-parallel-size", "2"],
    "dense-pp2-interleaved": MODEL + ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                                      "--global-batch-size", "2"],
    "moe-ep2": MODEL + MOE + ["--expert-model-parallel-size", "2"],
    "moe-tp2-sp": MODEL + MOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "moe-tp2-sp-etp1-ep2": MODEL + MOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                          "--expert-tensor-parallel-size", "1", "--expert-model-parallel-size", "2"],
    "moe-tied-layernorm-bias-pp2": TIED_LAYERNORM_BIAS + MOE + ["--pipeline-model-parallel-size", "2"],
}

# Memory: a model whose activations and states are of similar size (fp32, CPU).
MEM_MODEL = (
    "--num-layers 4 --hidden-size 128 --ffn-hidden-size 512 --num-attention-heads 4 --num-query-groups 4 "
    "--seq-length 128 --vocab-size 1024 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--untie-embeddings-and-output-weights --disable-bias-linear --transformer-impl local "
    "--micro-batch-size 4 --global-batch-size 8 --lr 1e-3"
).split()
MEM_LAYOUTS_1 = {
    "dense": [],
    "dense-full-recompute": ["--recompute-granularity", "full"],
    "moe-top2": MOE,
}
MEM_LAYOUTS_2 = {
    "dense-dp2-distopt": ["--use-distributed-optimizer"],
    "dense-tp2-sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "dense-pp2": ["--pipeline-model-parallel-size", "2", "--global-batch-size", "16"],
    "moe-ep2-alltoall": MOE + ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"],
    "moe-tp2-sp-etp1-ep2": MOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                  "--expert-tensor-parallel-size", "1", "--expert-model-parallel-size", "2"],
}


def _configure(argv):
    from btx_megatron.config import parse_config
    from btx_megatron.models import virtual_pipeline_size
    from btx_megatron.runtime.distributed import initialize_distributed

    cfg, _ = parse_config(argv)
    cfg.validate_layout(int(os.environ["WORLD_SIZE"]))
    initialize_distributed(cfg.parallel, 1, virtual_pipeline_size=virtual_pipeline_size(cfg))
    return cfg


def count_parameters(layouts: dict[str, list[str]]) -> dict:
    """{layout: ((built dense, built expert), (accounting dense, accounting expert))} of this rank."""
    from megatron.core import parallel_state

    from btx_megatron.models import build_model_chunks, transformer_config
    from btx_megatron.models.accounting import stage_parameters

    out = {}
    for name, argv in layouts.items():
        cfg = _configure(argv)
        chunks = build_model_chunks(cfg, transformer_config(cfg))
        built = [0, 0]
        for chunk in chunks:
            for pname, p in chunk.named_parameters():
                built[".mlp.experts." in pname] += p.numel()
        counted = stage_parameters(cfg.model, cfg.parallel, parallel_state.get_pipeline_model_parallel_rank())
        out[name] = (tuple(built), (counted.dense, counted.expert))
    return out


def count_flops(layouts: dict[str, list[str]]) -> dict:
    """{layout: (FlopCounterMode counts by op, accounting linear, accounting full attention)} for
    one forward + backward of a [2, S] batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from btx_megatron.models import build_model_chunks, transformer_config
    from btx_megatron.models.accounting import forward_flops_per_token

    out = {}
    for name, argv in layouts.items():
        cfg = _configure(argv)
        model = build_model_chunks(cfg, transformer_config(cfg))[0]
        b, s = 2, cfg.model.seq_length
        tokens = torch.randint(0, cfg.model.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
        counter = FlopCounterMode(display=False)
        with counter:
            model(tokens, torch.arange(s).expand(b, s), None, labels=tokens).sum().backward()
        counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        f = forward_flops_per_token(cfg.model, s, causal=False)
        out[name] = (counts, 3 * f.linear * b * s, 3 * f.attention * b * s)
    return out


def _peak_allocated(body) -> int:
    """Peak bytes of tensors allocated inside ``body()`` (CPU allocator events of the profiler)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # frees of earlier windows' tensors must not land in this one
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        body()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    allocations = sorted((e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
                          if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    base = allocations[0].extra_fields.total_allocated - allocations[0].extra_fields.alloc_size
    return max(e.extra_fields.total_allocated for e in allocations) - base


def measure_memory(layouts: dict[str, list[str]]) -> dict:
    """{layout: (measured peak bytes, estimated bytes)} of this rank, two training steps."""
    import torch
    from megatron.core import parallel_state

    from btx_megatron.models import virtual_pipeline_size
    from btx_megatron.training.memory import estimate_memory
    from btx_megatron.training.setup import setup_training
    from btx_megatron.training.step import forward_step

    out = {}
    for name, extra in layouts.items():
        cfg = _configure(MEM_MODEL + extra)
        m, t = cfg.model, cfg.train
        vp = virtual_pipeline_size(cfg)

        def batches():
            g = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())
            while True:
                tok = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length + 1), generator=g)
                yield {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(t.micro_batch_size, m.seq_length),
                       "position_ids": torch.arange(m.seq_length).expand(t.micro_batch_size, -1)}

        def two_steps():
            setup = setup_training(cfg)
            iterators = [batches() for _ in range(vp or 1)]
            for _ in range(2):
                for chunk in setup.model:
                    chunk.zero_grad_buffer()
                setup.optimizer.zero_grad()
                setup.forward_backward(forward_step_func=forward_step, data_iterator=iterators if vp else iterators[0],
                                       model=setup.model, num_microbatches=setup.num_microbatches,
                                       seq_length=m.seq_length, micro_batch_size=t.micro_batch_size, forward_only=False)
                setup.optimizer.step()

        peak = _peak_allocated(two_steps)
        estimate = estimate_memory(cfg, torch.distributed.get_world_size(), parallel_state.get_pipeline_model_parallel_rank(), gpu=False)
        out[name] = (peak, estimate.total)
    return out


def world1_worker() -> tuple[dict, dict]:
    flop_layouts = {"dense": MODEL, "moe-top2": MODEL + MOE, "moe-soft": MODEL + ["--num-experts", "4", "--moe-router-type", "soft"],
                    "dense-unfused-attention": MODEL + ["--attention-backend", "unfused"]}
    # Memory first: a backward outside Megatron's schedules (the FLOP count) leaves MoE's aux-loss
    # scale as a 0-d tensor, which the schedules then refuse to copy their scale into.
    memory = measure_memory(MEM_LAYOUTS_1)
    return count_flops(flop_layouts), memory


def world2_worker() -> tuple[dict, dict]:
    return count_parameters(PARAM_LAYOUTS), measure_memory(MEM_LAYOUTS_2)


@pytest.fixture(scope="module")
def world1():
    return run_distributed(world1_worker, 1)[0]


@pytest.fixture(scope="module")
def world2():
    return run_distributed(world2_worker, 2)


def test_parameter_counts_equal_built_model_on_every_rank(world2):
    for rank, (params, _) in enumerate(world2):
        for layout, (built, counted) in params.items():
            assert built == counted, f"rank {rank} {layout}: built (dense, expert) {built}, accounting {counted}"
        assert params["moe-ep2"][0][1] > 0 and params["dense-tp2"][0][1] == 0
    # The two pipeline stages differ (embedding vs output layer); the accounting follows each.
    assert world2[0][0]["dense-tied-layernorm-bias-pp2"] != world2[1][0]["dense-tied-layernorm-bias-pp2"]


def test_flops_equal_flop_counter(world1):
    flops, _ = world1
    for layout, (counts, linear, attention) in flops.items():
        assert counts["aten.mm"] == linear, layout
        if layout == "dense-unfused-attention":
            # QK^T (baddbmm) and attention-weighted V (bmm), full score matrix.
            assert counts["aten.bmm"] + counts["aten.baddbmm"] == attention
    # Soft routing runs every expert: 4 experts' FLOPs against top-2's 2 (and dense's 1).
    assert flops["moe-soft"][1] > flops["moe-top2"][1] > flops["dense"][1]


def test_memory_estimate_within_20_percent_of_measured_peak(world1, world2):
    _, memory1 = world1
    results = {f"{layout} (rank 0, world 1)": v for layout, v in memory1.items()}
    for rank, (_, memory2) in enumerate(world2):
        results.update({f"{layout} (rank {rank}, world 2)": v for layout, v in memory2.items()})
    assert len(results) >= 8
    for name, (measured, estimated) in results.items():
        assert 0.8 <= estimated / measured <= 1.2, f"{name}: estimated {estimated / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    # The estimate must track what changes: recompute and sharding cut the measured peak too.
    assert memory1["dense-full-recompute"][0] < 0.75 * memory1["dense"][0]
    assert world2[0][1]["dense-tp2-sp"][0] < 0.7 * memory1["dense"][0]


# --------------------------------------------------------------------------------------------
# The --dry-run command line (in this process: nothing is built, no process group is started)
# --------------------------------------------------------------------------------------------

LLAMA2_7B = (
    "--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32 --seq-length 4096 "
    "--swiglu --normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights "
    "--disable-bias-linear --vocab-size 32000 --bf16 --micro-batch-size 1 --global-batch-size 1024"
).split()


def test_llama2_7b_parameter_and_flop_counts():
    from btx_megatron.config import parse_config
    from btx_megatron.models.accounting import active_parameters, flops_per_token, total_parameters

    cfg, _ = parse_config(LLAMA2_7B)
    assert total_parameters(cfg.model).total == 6_738_415_616   # the published Llama-2 7B count
    moe, _ = parse_config(LLAMA2_7B + ["--num-experts", "4", "--moe-router-topk", "2"])
    ffn = 3 * 4096 * 11008 * 32
    assert total_parameters(moe.model).expert == 4 * ffn
    assert active_parameters(moe.model) == 6_738_415_616 + ffn + 32 * 4 * 4096   # a second expert + routers
    # 6 N per token over the matmul weights (all but the embedding table and the 65 norms) plus
    # causal attention, 3 x (2 x 2 x S x H / 2) per layer.
    matmul_weights = 6_738_415_616 - 32000 * 4096 - 65 * 4096
    assert flops_per_token(cfg.model, 4096) == 6 * matmul_weights + 3 * 32 * 2 * 4096 * 4096


def test_dry_run_plans_a_cluster_layout_without_building(capsys):
    from btx_megatron import pretrain
    from btx_megatron.config import parse_config
    from btx_megatron.models.accounting import stage_parameters
    from btx_megatron.training.memory import estimate_memory

    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer"]
    code = pretrain.main(["--dry-run", "--nnodes", "1", "--nproc-per-node", "8", "--mfu", "0.5", *LLAMA2_7B, *layout])
    out = capsys.readouterr().out
    assert code == 0, out
    cfg, _ = parse_config(LLAMA2_7B + layout)
    per_rank = stage_parameters(cfg.model, cfg.parallel, 0)
    assert f"stage 0: {per_rank.total / 1e6:10.2f} M" in out
    assert "plan: 8 devices (1 node x 8)" in out and "DP 4" in out
    estimate = estimate_memory(cfg, 8, 0, gpu=True)
    assert f"peak device as configured: {estimate.total / 2**30:.1f} GiB -> fits in 80 GiB" in out
    # tokens/s = devices x peak x MFU / FLOPs per token
    from btx_megatron.models.accounting import flops_per_token

    expected = 8 * 989e12 * 0.5 / flops_per_token(cfg.model, 4096)
    assert f"{expected:,.0f} tokens/s" in out


@pytest.mark.parametrize("argv, message", [
    (["--dry-run", "--world-size", "3", "--tensor-model-parallel-size", "2"], "World size 3 is not divisible"),
    (["--dry-run", "--world-size", "8", "--nnodes", "2", "--nproc-per-node", "8"], "disagrees with --nnodes"),
    (["--dry-run", "--world-size", "8", "--mfu", "40"], "--mfu 40.0 must be a fraction"),
    (["--world-size", "8"], "need --dry-run"),
], ids=["layout", "world-vs-nodes", "mfu-percent", "no-dry-run"])
def test_dry_run_refuses_bad_input_with_one_line(argv, message, capsys):
    from btx_megatron import pretrain

    code = pretrain.main(argv + LLAMA2_7B)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_mix_dry_run_needs_the_expert_count_without_a_checkpoint(capsys):
    from btx_megatron import pretrain_mix

    assert pretrain_mix.main(["--dry-run", "--world-size", "32", "--load", "/nowhere/merged", *LLAMA2_7B]) == 2
    assert "needs --num-experts" in capsys.readouterr().err
    argv = ["--dry-run", "--nnodes", "4", "--nproc-per-node", "8", "--load", "/nowhere/merged", *LLAMA2_7B,
            "--num-experts", "4", "--expert-model-parallel-size", "4", "--use-distributed-optimizer"]
    assert pretrain_mix.main(argv) == 0
    out = capsys.readouterr().out
    from btx_megatron.config import parse_config
    from btx_megatron.models.accounting import total_parameters

    total = total_parameters(parse_config(LLAMA2_7B + ["--num-experts", "4"])[0].model)
    assert f"model: {total.total / 1e9:.3f} B parameters" in out and "EP 4" in out and "expert DP 8" in out
