#!/bin/bash
# BTX mix phase: continue pretraining the merged MoE on the paper's data mix (multi-node, H100).
#
#   MERGED=ckpt/btx-moe SAVE=ckpt/btx-mix DATA=data TOKENIZER=data/tokenizer.model \
#       sbatch --nodes 4 slurm/mix.sh
#
# Variables a user sets (defaults below): MERGED (output of tools/merge_branches.py), SAVE
# (this run's checkpoints; a requeued job resumes from here), DATA (directory of the
# preprocessed indexed datasets {math,code,wiki,seed}_{train,valid}), TOKENIZER, TP, PP, EP,
# MICRO_BATCH, GLOBAL_BATCH, TRAIN_ITERS, ROUTER (topk|switch|sample-top1|soft), TOPK, and
# EXTRA_ARGS (appended last, so they override anything here).
# Expert count and names come from the merged checkpoint's manifest (see pretrain_mix).
#
# Pre-emption / time limit: SLURM sends SIGUSR1 to every training process 5 minutes before the
# end (--signal); the trainer saves a checkpoint and exits 0 with exit_reason "signal" in
# eval_summary.json, and this script requeues the job, which resumes from $SAVE. A job
# pre-empted by the scheduler (SIGTERM, --requeue) is requeued by SLURM itself and resumes the
# same way.

#SBATCH --job-name=btx-mix
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

MERGED=${MERGED:?set MERGED to the merged MoE checkpoint (tools/merge_branches.py --output)}
SAVE=${SAVE:?set SAVE to the checkpoint directory of this run}
DATA=${DATA:-data}
TOKENIZER=${TOKENIZER:-$DATA/tokenizer.model}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-4}                       # experts spread over GPUs; must divide the expert count (4 for seed+3 branches)
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-1024}  # 1024 x 4096 = 4M tokens per step (paper)
TRAIN_ITERS=${TRAIN_ITERS:-19073}   # 80B tokens / 4M (paper's MoE finetune)
ROUTER=${ROUTER:-topk}
TOPK=${TOPK:-2}
EXTRA_ARGS=${EXTRA_ARGS:-}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Under sbatch BASH_SOURCE is a spool copy; prefer the submit directory when it is the repo.
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "$SLURM_SUBMIT_DIR/btx_megatron/pretrain_mix.py" ]]; then
    REPO=$SLURM_SUBMIT_DIR
fi
cd "$REPO"
mkdir -p logs "$SAVE"

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export CUDA_DEVICE_MAX_CONNECTIONS=1       # TP/SP communication overlap ordering
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export PYTHONUNBUFFERED=1

# Llama-2 7B (the paper's seed); must match the merged checkpoint (checked before compute).
MODEL_ARGS=(
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008
    --num-attention-heads 32 --num-query-groups 32 --seq-length 4096 --max-position-embeddings 4096
    --swiglu --normalization RMSNorm --norm-epsilon 1e-5
    --position-embedding-type rope --rotary-base 10000
    --untie-embeddings-and-output-weights --disable-bias-linear
    --bf16
)

# Router and balancing as the paper: top-2, aux loss alpha * N * sum u_i p_i with alpha 0.01.
MOE_ARGS=(
    --moe-router-type "$ROUTER"
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.01
    --moe-router-dtype fp32
    --moe-token-dispatcher-type alltoall
    --expert-model-parallel-size "$EP"
)
if [[ "$ROUTER" == topk ]]; then
    MOE_ARGS+=(--moe-router-topk "$TOPK")
fi

# Paper's mix: 30.16% math, 40.31% code, 10.30% wiki, 19.23% seed data.
DATA_ARGS=(
    --data-path 30.16 "$DATA/math_train" 40.31 "$DATA/code_train" 10.30 "$DATA/wiki_train" 19.23 "$DATA/seed_train"
    --split 100,0,0
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER"
    --eval-domain math="$DATA/math_valid" --eval-domain code="$DATA/code_valid"
    --eval-domain wiki="$DATA/wiki_valid" --eval-domain seed="$DATA/seed_valid"
)

# AdamW, wd 0.1, peak LR 1e-4, 100 warmup steps, cosine to 10% of peak (paper).
TRAIN_ARGS=(
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
    --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters 100 --lr-decay-style cosine
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
    --seed 1234
)
if (( TP > 1 )); then
    TRAIN_ARGS+=(--sequence-parallel)   # MoE layers with TP need sequence parallelism
fi

# Transformer Engine (in the cluster container): fused layers, grouped-GEMM experts, FP8.
if python -c "import transformer_engine" 2>/dev/null; then
    MODEL_ARGS+=(--transformer-impl transformer_engine)
    MOE_ARGS+=(--moe-grouped-gemm)
    TRAIN_ARGS+=(--fp8-format hybrid --fp8-recipe delayed --fp8-amax-history-len 1024 --fp8-amax-compute-algo max)
else
    echo "transformer_engine not importable: local layers, no grouped GEMM, no FP8" >&2
    MODEL_ARGS+=(--transformer-impl local)
fi

# --load is the merged model: the first job starts it at iteration 0 with a fresh optimizer;
# a requeued job finds its own checkpoints in --save and resumes there.
CKPT_ARGS=(
    --load "$MERGED" --save "$SAVE" --save-interval 500
    --dist-ckpt-optim-fully-reshardable
)

LOG_ARGS=(
    --log-interval 10 --eval-interval 500 --eval-iters 20
    --tensorboard-dir "$SAVE/tensorboard"
)

echo "[mix] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES nodes: TP $TP PP $PP EP $EP, router $ROUTER"

# shellcheck disable=SC2086  # EXTRA_ARGS is split on purpose
srun --kill-on-bad-exit=1 --cpu-bind=none \
    python -m btx_megatron.pretrain_mix \
        "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" \
        "${CKPT_ARGS[@]}" "${LOG_ARGS[@]}" $EXTRA_ARGS

# The trainer saved and exited on SIGUSR1 (time limit ahead): run the rest in a new job.
if python - "$SAVE/eval_summary.json" <<'PY'
import json, sys
sys.exit(0 if json.load(open(sys.argv[1])).get("exit_reason") == "signal" else 1)
PY
then
    echo "[mix] stopped by signal before finishing: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
