#!/bin/bash
# Step 5: the mix phase on 4 nodes (32 H100): the paper's data mix (30.16/40.31/10.30/19.23 %
# math/code/wiki/seed), top-2 routing, load-balancing loss 0.01, 80B tokens = 19073 steps of 4M.
# Layout (see README): TP 2 + sequence parallel, EP 4, expert TP 2, PP 1 -> DP 16.
#   source examples/llama2_7b/env.sh && bash examples/llama2_7b/05_mix.sh
set -euo pipefail
MERGED="$OUT_DIR/merged" SAVE="$OUT_DIR/mix/checkpoints" DATA="$DATA" TOKENIZER="$TOKENIZER_MODEL" \
TP=2 PP=1 EP=4 MICRO_BATCH=1 GLOBAL_BATCH=1024 TRAIN_ITERS=19073 ROUTER=topk TOPK=2 \
EXTRA_ARGS="--expert-tensor-parallel-size 2" \
    sbatch --account="$ACCOUNT" --partition="$PARTITION" --nodes=4 --export=ALL slurm/mix.sh
