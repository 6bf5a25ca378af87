#!/bin/bash
# Step 3: the three branches, each an independent 8-node job (64 H100) from the seed.
#   source examples/llama2_7b/env.sh && bash examples/llama2_7b/03_branches.sh
# Paper budgets at 4M tokens/step: math 201B tokens (48k steps), code 210B (50k), wiki 42B (10k).
# Each job requeues itself on pre-emption/time limit and resumes from its own checkpoints.
set -euo pipefail
submit() {  # domain, iterations
    DOMAIN=$1 TRAIN_ITERS=$2 DATA_PATH="1.0 $DATA/$1_train" EVAL_DATA="$DATA/$1_valid" \
        sbatch --account="$ACCOUNT" --partition="$PARTITION" --nodes=8 --export=ALL "slurm/branch_$1.sh"
}
submit math 48000
submit code 50000
submit wiki 10000
# Or, generated from one experiment file: python tools/launch_branches.py EXP.yaml --slurm [--dry-run]
