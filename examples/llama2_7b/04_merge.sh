#!/bin/bash
# Step 4: merge the branches into the 4x7B BTX MoE, the seed as the 4th ("generalist") expert.
# One node, 8 processes: each reads and writes 1/8 of the tensors (CPU work; ~40 GB written in bf16).
#   source examples/llama2_7b/env.sh && sbatch -A "$ACCOUNT" -p "$PARTITION" -N 1 --ntasks-per-node 8 -c 8 examples/llama2_7b/04_merge.sh
set -euo pipefail
torchrun --nproc-per-node 8 tools/merge_branches.py \
    --branch math="$OUT_DIR/branches/math/checkpoints" \
    --branch code="$OUT_DIR/branches/code/checkpoints" \
    --branch wiki="$OUT_DIR/branches/wiki/checkpoints" \
    --seed-expert "$SEED_CKPT" \
    --router-init random --router-seed 1234 --moe-router-topk 2 \
    --dtype bfloat16 --output "$OUT_DIR/merged"
