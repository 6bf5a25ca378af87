#!/bin/bash
# The run logic every training job script shares (slurm/branch.sbatch, slurm/mix.sh, the job
# scripts tools/launch_branches.py writes): cluster environment, rendezvous, first start or
# requeue, srun, signal forwarding and the self-requeue. Sourced, not submitted.
#
# The sourcing script sets: BTX_ROOT, PYTHON, RUN_NAME, SAVE (this run's checkpoints), RUN_DIR,
# INIT_CHECKPOINT (what a first start loads), FIRST_START_ARGS (flags added on the first start
# only, e.g. --finetune), INIT_WHAT (a word for the log), TRAIN_ITERS, TRAINER_MODULE (default
# btx_megatron.pretrain) and the flag arrays MODEL_ARGS MOE_ARGS PARALLEL_ARGS PRECISION_ARGS
# DATA_ARGS TRAIN_ARGS CKPT_ARGS LOG_ARGS (CKPT_ARGS carries --save "$SAVE").
#
# Start or resume, the same for every job: the first start runs with --load INIT_CHECKPOINT
# --save SAVE plus FIRST_START_ARGS; once SAVE holds a checkpoint (a requeue or a restart) the
# job runs with --load SAVE --save SAVE and continues with its optimizer, scheduler and data
# position.
#
# Pre-emption and time limit: `#SBATCH --signal=B:USR1@300` signals this batch shell; the trap
# forwards USR1 to srun, which forwards it to every task; the trainer saves at the end of its
# step and exits 0, and the job requeues itself (`scontrol requeue`) while it has iterations
# left. SLURM restarts the script with SLURM_RESTART_COUNT + 1, and the start-or-resume rule
# above picks up the checkpoint.

# ---- NCCL / CUDA -------------------------------------------------------------------------
# Megatron-Core overlaps TP communication with compute only with one hardware queue.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_IB_QPS_PER_CONNECTION=${NCCL_IB_QPS_PER_CONNECTION:-4}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# export NCCL_SOCKET_IFNAME=ib0   NCCL_IB_HCA=mlx5     # site specific
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Rank/world come from SLURM_PROCID/SLURM_NTASKS (srun); the rendezvous is the first node.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# ---- First start or requeue ----------------------------------------------------------------
if [[ -f "$SAVE/latest_checkpointed_iteration.txt" ]]; then
    # Requeue/restart: the run's own latest checkpoint (optimizer, scheduler, data position).
    START_ARGS=(--load "$SAVE")
    echo "[btx] $RUN_NAME: restart ${SLURM_RESTART_COUNT:-0}, resuming from $SAVE (iteration $(cat "$SAVE/latest_checkpointed_iteration.txt"))"
else
    START_ARGS=(--load "${INIT_CHECKPOINT:?set the checkpoint the first start loads (SEED_CKPT, MERGED)}" "${FIRST_START_ARGS[@]}")
    echo "[btx] $RUN_NAME: first start from ${INIT_WHAT:-} $INIT_CHECKPOINT"
fi

# ---- Run: one task per GPU; the trainer reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID -----
SIGNALLED=0
forward_signal() {
    SIGNALLED=1
    echo "[btx] $RUN_NAME: time limit or preemption signal; asking the trainer to save and exit"
    # srun forwards the signal to every task; the trainer saves at the end of its step.
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
}
trap forward_signal USR1 TERM

srun --kill-on-bad-exit=1 --cpu-bind=none --export=ALL \
    "$PYTHON" -u -m "${TRAINER_MODULE:-btx_megatron.pretrain}" \
    "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${PRECISION_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" "${CKPT_ARGS[@]}" "${LOG_ARGS[@]}" "${START_ARGS[@]}" &
SRUN_PID=$!

# `wait` returns early when a trapped signal arrives: keep waiting until srun has exited.
set +e
while true; do
    wait "$SRUN_PID"
    RC=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
set -e

DONE_ITER=$(cat "$SAVE/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0)
if [[ $RC -eq 0 && $SIGNALLED -eq 1 && $DONE_ITER -lt $TRAIN_ITERS ]]; then
    echo "[btx] $RUN_NAME: saved iteration $DONE_ITER of $TRAIN_ITERS; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$RC"
