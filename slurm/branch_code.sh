#!/bin/bash
# BTX branch 'code': Llama-2 7B seed continued on the code data (paper budget: 50000 steps of 4M tokens).
#
#   sbatch --account=ACCOUNT --partition=PARTITION slurm/branch_code.sh       # from the repository root
#   SEED_CKPT=/ckpt/llama2-7b OUT_DIR=/runs/btx sbatch -A ACCOUNT -p PARTITION --nodes=16 slurm/branch_code.sh
#
# Variables a user sets (environment at submission, or edit the defaults below):
#   SEED_CKPT, OUT_DIR, DATA_DIR, TOKENIZER_MODEL, TRAIN_ITERS; account/partition/nodes on the
#   sbatch command line; model size, layout, precision, batch and intervals (NUM_LAYERS, TP,
#   PRECISION, GLOBAL_BATCH, ...) as documented in slurm/branch.sbatch, which builds the flag
#   arrays. The run logic (environment, first start vs requeue, srun, signals) is slurm/train_job.sh.
#
#SBATCH --job-name=btx-code
#SBATCH --nodes=8
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
DOMAIN=code
SEED_CKPT=${SEED_CKPT:-/ckpt/llama2-7b-megatron}
OUT_DIR=${OUT_DIR:-/runs/btx-llama2-7b}
DATA_DIR=${DATA_DIR:-/data/btx}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$SEED_CKPT/tokenizer.model}
DATA_PATH=${DATA_PATH:-"1.0 ${DATA_DIR}/code_text_document"}
EVAL_DATA=${EVAL_DATA:-$DATA_DIR/code_valid_text_document}
TRAIN_ITERS=${TRAIN_ITERS:-50000}
BTX_ROOT=${BTX_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
source "$BTX_ROOT/slurm/branch.sbatch"
