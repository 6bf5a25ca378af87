#!/bin/bash
# BTX mix phase: continue pretraining the merged MoE on the paper's data mix (multi-node, H100).
#
#   MERGED=ckpt/btx-moe SAVE=ckpt/btx-mix DATA=data TOKENIZER=data/tokenizer.model \
#       sbatch --nodes 4 slurm/mix.sh
#
# Variables a user sets (defaults in brackets):
#   MERGED       the merged MoE checkpoint (tools/merge_branches.py --output); loaded on the first start
#   SAVE         this run's checkpoints; a requeued or restarted job resumes from here
#   DATA [data]  directory of the preprocessed indexed datasets {math,code,wiki,seed}_{train,valid}
#   TOKENIZER [$DATA/tokenizer.model]
#   TRAIN_ITERS [19073]  iterations of GLOBAL_BATCH x SEQ_LENGTH tokens (paper: 80B tokens)
#   ROUTER [topk] (topk | switch | sample-top1 | soft)   TOPK [2]
#   EP [4] (must divide the expert count: 4 for seed + 3 branches)   TP [1]   PP [1]
#   MICRO_BATCH [1] GLOBAL_BATCH [1024] LR [1e-4] MIN_LR [1e-5] WARMUP_ITERS [100]
#   NUM_LAYERS [32] HIDDEN_SIZE [4096] FFN_HIDDEN_SIZE [11008] NUM_ATTENTION_HEADS [32]
#   NUM_QUERY_GROUPS [32] SEQ_LENGTH [4096]   (must match MERGED; checked before any compute)
#   TRANSFORMER_IMPL and PRECISION [transformer_engine and fp8 when Transformer Engine imports,
#     else local and bf16; PRECISION fp8 | bf16 | fp32]
#   SAVE_INTERVAL [500] LOG_INTERVAL [10] EVAL_INTERVAL [500] EVAL_ITERS [20] TENSORBOARD [1]
#   EXTRA_ARGS   appended last, so they override anything here
#   BTX_ROOT [the submit directory]   PYTHON [python]
# Expert count and names come from the merged checkpoint's manifest (see pretrain_mix).
#
# Start or resume, pre-emption and requeue work as for the branch jobs (slurm/train_job.sh): the
# first start runs --load $MERGED --save $SAVE (pretrain_mix starts a merge output at iteration 0
# with a fresh optimizer); once $SAVE holds a checkpoint the job runs --load $SAVE --save $SAVE.
# SLURM signals this shell with USR1 5 minutes before the time limit; the trainer saves and exits
# 0, and the job requeues itself while iterations are left.

#SBATCH --job-name=btx-mix
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

BTX_ROOT=${BTX_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${PYTHON:-python}
RUN_NAME=${RUN_NAME:-mix}
MERGED=${MERGED:?set MERGED to the merged MoE checkpoint (tools/merge_branches.py --output)}
SAVE=${SAVE:?set SAVE to the checkpoint directory of this run}
RUN_DIR=$SAVE
DATA=${DATA:-data}
TOKENIZER=${TOKENIZER:-$DATA/tokenizer.model}
TRAIN_ITERS=${TRAIN_ITERS:-19073}   # 80B tokens / 4M (paper's MoE finetune)
ROUTER=${ROUTER:-topk}
TOPK=${TOPK:-2}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-4}
EXTRA_ARGS=${EXTRA_ARGS:-}
cd "$BTX_ROOT"
mkdir -p "$SAVE"

# Transformer Engine (in the cluster container): fused layers, grouped-GEMM experts, FP8.
if [[ -z "${TRANSFORMER_IMPL:-}" ]]; then
    if "$PYTHON" -c "import transformer_engine" 2>/dev/null; then
        TRANSFORMER_IMPL=transformer_engine
    else
        echo "[mix] transformer_engine not importable: local layers, no grouped GEMM, no FP8" >&2
        TRANSFORMER_IMPL=local
    fi
fi
if [[ -z "${PRECISION:-}" ]]; then
    PRECISION=$([[ "$TRANSFORMER_IMPL" == transformer_engine ]] && echo fp8 || echo bf16)
fi

# ---- Flags --------------------------------------------------------------------------------
# Llama-2 7B (the paper's seed); must match the merged checkpoint (checked before compute).
MODEL_ARGS=(
    --num-layers "${NUM_LAYERS:-32}" --hidden-size "${HIDDEN_SIZE:-4096}" --ffn-hidden-size "${FFN_HIDDEN_SIZE:-11008}"
    --num-attention-heads "${NUM_ATTENTION_HEADS:-32}" --num-query-groups "${NUM_QUERY_GROUPS:-32}"
    --seq-length "${SEQ_LENGTH:-4096}" --max-position-embeddings "${SEQ_LENGTH:-4096}"
    --swiglu --normalization RMSNorm --norm-epsilon 1e-5
    --position-embedding-type rope --rotary-base 10000
    --untie-embeddings-and-output-weights --disable-bias-linear
    --transformer-impl "$TRANSFORMER_IMPL"
)

# Router and balancing as the paper: top-2, aux loss alpha * N * sum u_i p_i with alpha 0.01.
MOE_ARGS=(
    --moe-router-type "$ROUTER"
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.01
    --moe-router-dtype fp32
    --moe-token-dispatcher-type alltoall
)
if [[ "$ROUTER" == topk ]]; then
    MOE_ARGS+=(--moe-router-topk "$TOPK")
fi
if [[ "$TRANSFORMER_IMPL" == transformer_engine ]]; then
    MOE_ARGS+=(--moe-grouped-gemm)
fi

PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP"
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
)
if (( TP > 1 )); then
    PARALLEL_ARGS+=(--sequence-parallel)   # MoE layers with TP need sequence parallelism
fi

case "$PRECISION" in
    fp8)  PRECISION_ARGS=(--bf16 --fp8-format hybrid --fp8-recipe delayed
                          --fp8-amax-history-len 1024 --fp8-amax-compute-algo max) ;;
    bf16) PRECISION_ARGS=(--bf16) ;;
    fp32) PRECISION_ARGS=() ;;
    *)    echo "[mix] PRECISION=$PRECISION: use fp8, bf16 or fp32" >&2; exit 2 ;;
esac

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
    --micro-batch-size "${MICRO_BATCH:-1}" --global-batch-size "${GLOBAL_BATCH:-1024}"   # 1024 x 4096 = 4M tokens per step
    --train-iters "$TRAIN_ITERS"
    --lr "${LR:-1e-4}" --min-lr "${MIN_LR:-1e-5}" --lr-warmup-iters "${WARMUP_ITERS:-100}" --lr-decay-style cosine
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --seed 1234
)

# Optimizer state that reloads at any layout (change TP/PP/EP between restarts).
CKPT_ARGS=(--save "$SAVE" --save-interval "${SAVE_INTERVAL:-500}" --dist-ckpt-optim-fully-reshardable)

LOG_ARGS=(--log-interval "${LOG_INTERVAL:-10}" --eval-interval "${EVAL_INTERVAL:-500}" --eval-iters "${EVAL_ITERS:-20}")
if [[ "${TENSORBOARD:-1}" == 1 ]]; then
    LOG_ARGS+=(--tensorboard-dir "$SAVE/tensorboard")
fi
# shellcheck disable=SC2206  # EXTRA_ARGS is split on purpose
LOG_ARGS+=($EXTRA_ARGS)   # last, so they override the flags above

echo "[mix] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES nodes: TP $TP PP $PP EP $EP, router $ROUTER, $PRECISION"

# ---- Environment, first start (--load MERGED) or requeue (--load SAVE), srun, signals ---------
TRAINER_MODULE=btx_megatron.pretrain_mix
INIT_CHECKPOINT=$MERGED
FIRST_START_ARGS=()   # pretrain_mix starts a merge output at iteration 0 with a fresh optimizer
INIT_WHAT="the merged model"
source "$BTX_ROOT/slurm/train_job.sh"
