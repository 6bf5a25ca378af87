"""The paths the cluster scripts use, on CPU and gloo: the alltoall token dispatcher (slurm/mix.sh)
and the overlapped DDP flags (--overlap-grad-reduce, --overlap-param-gather with the distributed
optimizer) at DP2 x PP2 x EP2.

Every run starts from one saved tiny MoE (experts are initialised per EP rank, so only a loaded
checkpoint makes layouts comparable) and trains 20 fp32 iterations on the same data. The alltoall
dispatcher must give the allgather dispatcher's loss curve (<= 1e-5 relative) at EP2 and EP4, and
both must equal EP1; the overlapped run must equal the non-overlapped one (<= 1e-5 relative) and
must really have taken the asynchronous collective paths.

Process start-ups dominate on CPU: one world-2 process group runs the EP1/EP2 trainings in sequence,
one world-4 group the DP2 x PP2 x EP2 pair; EP4 and TP2 x EP2 (a second world-4 group) are marked
slow.
"""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.distributed.workers import TINY_MOE, train

STEPS = 20
OVERLAP_STEPS = 10
RTOL = 1e-5
ALLTOALL = ["--moe-token-dispatcher-type", "alltoall"]
ALLGATHER = ["--moe-token-dispatcher-type", "allgather"]
OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather"]
DP2_PP2_EP2 = ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--use-distributed-optimizer"]


def _count_collectives(calls: list) -> None:
    """Record the ``async_op`` of every gradient reduce-scatter / parameter all-gather that
    Megatron-Core's DDP buckets issue (the module-level functions its buffers call)."""
    from megatron.core.distributed import param_and_grad_buffer as buffers

    def wrap(kind, fn):
        def call(*args, **kwargs):
            calls.append((kind, bool(kwargs.get("async_op", False))))
            return fn(*args, **kwargs)
        call.wrapped = fn
        return call

    for name, kind in (("dist_reduce_scatter_func", "reduce_scatter"), ("dist_all_gather_func", "all_gather")):
        fn = getattr(buffers, name)
        setattr(buffers, name, wrap(kind, getattr(fn, "wrapped", fn)))


def train_sequence(runs: dict[str, list[str]]) -> dict[str, dict]:
    """Several trainings in this process, in order; each result carries the DDP collectives."""
    out = {}
    for name, argv in runs.items():
        calls: list = []
        _count_collectives(calls)
        result = train(argv)
        result["collectives"] = sorted(set(calls))
        out[name] = result
    return out


def _run(init, *layout, steps=STEPS):
    return TINY_MOE + list(layout) + ["--train-iters", str(steps), "--load", str(init), "--finetune"]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    init = tmp_path_factory.mktemp("moe_init") / "ckpt"
    runs = {
        "init": TINY_MOE + ["--save", str(init), "--train-iters", "0"],
        "ep1": _run(init, *ALLGATHER),
        "ep2-allgather": _run(init, "--expert-model-parallel-size", "2", *ALLGATHER),
        "ep2-alltoall": _run(init, "--expert-model-parallel-size", "2", *ALLTOALL),
        # Expert TP 1 under TP 2: tokens are gathered over the sequence-parallel ranks in
        # unequal shares (the uneven all-gather of cpu_compat).
        "tp2-sp-etp1-ep2-alltoall": _run(init, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                         "--expert-tensor-parallel-size", "1", "--expert-model-parallel-size", "2",
                                         *ALLTOALL),
    }
    runs = _same_on_every_rank(run_distributed(train_sequence, 2, runs))
    reference = runs["ep1"]["losses"]
    assert len(reference) == STEPS and reference[-1] < reference[0] - 0.05, "the reference must learn"
    return init, runs


@pytest.fixture(scope="module")
def world4_overlap(world2):
    init, _ = world2
    # slurm/mix.sh's DDP flags at DP2 x PP2 x EP2, with and without overlap; the first
    # OVERLAP_STEPS iterations of the reference's LR schedule.
    schedule = ["--lr-decay-iters", str(STEPS)]
    runs = {
        "dp2-pp2-ep2": _run(init, *DP2_PP2_EP2, *ALLTOALL, *schedule, steps=OVERLAP_STEPS),
        "dp2-pp2-ep2-overlap": _run(init, *DP2_PP2_EP2, *ALLTOALL, *OVERLAP, *schedule, steps=OVERLAP_STEPS),
    }
    return _same_on_every_rank(run_distributed(train_sequence, 4, runs))


@pytest.fixture(scope="module")
def world4_dispatch(world2):
    init, _ = world2
    runs = {
        "ep4-allgather": _run(init, "--expert-model-parallel-size", "4", *ALLGATHER),
        "ep4-alltoall": _run(init, "--expert-model-parallel-size", "4", *ALLTOALL),
        "tp2-sp-ep2-alltoall": _run(init, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                    "--expert-model-parallel-size", "2", *ALLTOALL),
    }
    return _same_on_every_rank(run_distributed(train_sequence, 4, runs))


def _same_on_every_rank(ranks: list[dict]) -> dict:
    for other in ranks[1:]:  # every rank reports the same global losses
        assert {k: v["losses"] for k, v in other.items()} == {k: v["losses"] for k, v in ranks[0].items()}
    return ranks[0]


def test_alltoall_equals_allgather_at_ep2_and_both_equal_ep1(world2):
    _, runs = world2
    ep1 = runs["ep1"]["losses"]
    assert runs["ep2-alltoall"]["losses"] == pytest.approx(runs["ep2-allgather"]["losses"], rel=RTOL, abs=0)
    assert runs["ep2-allgather"]["losses"] == pytest.approx(ep1, rel=RTOL, abs=0)
    assert runs["ep2-alltoall"]["losses"] == pytest.approx(ep1, rel=RTOL, abs=0)


def test_alltoall_with_expert_tp_below_tp_equals_ep1(world2):
    _, runs = world2
    assert runs["tp2-sp-etp1-ep2-alltoall"]["losses"] == pytest.approx(runs["ep1"]["losses"], rel=RTOL, abs=0)


@pytest.mark.slow  # a third process group (world 4, three more trainings)
def test_alltoall_equals_allgather_at_ep4_and_with_tp2_sp(world2, world4_dispatch):
    ep1 = world2[1]["ep1"]["losses"]
    runs = world4_dispatch
    assert runs["ep4-alltoall"]["losses"] == pytest.approx(runs["ep4-allgather"]["losses"], rel=RTOL, abs=0)
    assert runs["ep4-allgather"]["losses"] == pytest.approx(ep1, rel=RTOL, abs=0)
    assert runs["tp2-sp-ep2-alltoall"]["losses"] == pytest.approx(ep1, rel=RTOL, abs=0)


def test_overlapped_ddp_equals_non_overlapped_at_dp2_pp2_ep2(world2, world4_overlap):
    plain, overlapped = world4_overlap["dp2-pp2-ep2"], world4_overlap["dp2-pp2-ep2-overlap"]
    assert len(overlapped["losses"]) == OVERLAP_STEPS
    assert overlapped["losses"] == pytest.approx(plain["losses"], rel=RTOL, abs=0)
    # The layout itself trains like EP1 (same LR schedule for these iterations).
    assert plain["losses"] == pytest.approx(world2[1]["ep1"]["losses"][:OVERLAP_STEPS], rel=2e-5, abs=0)
    # The flags took effect: the overlapped run issued its gradient reduce-scatters and its
    # parameter all-gathers asynchronously (gloo work handles), the plain run synchronously.
    assert ("reduce_scatter", True) in overlapped["collectives"]
    assert ("all_gather", True) in overlapped["collectives"]
    assert all(not is_async for _, is_async in plain["collectives"]) and plain["collectives"]
