# Paths and cluster settings shared by every step of the Llama-2 7B BTX recipe.
#   source examples/llama2_7b/env.sh      (from the repository root; edit or export before sourcing)
export BTX_ROOT=${BTX_ROOT:-$(pwd)}
export HF_LLAMA=${HF_LLAMA:-/models/Llama-2-7b-hf}          # Hugging Face download of meta-llama/Llama-2-7b-hf
export WORK=${WORK:-/scratch/$USER/btx-llama2-7b}            # everything below is written here
export SEED_CKPT=${SEED_CKPT:-$WORK/ckpt/llama2-7b}          # imported seed (tools/convert_hf.py import)
export TOKENIZER_MODEL=${TOKENIZER_MODEL:-$SEED_CKPT/tokenizer/tokenizer.model}
export RAW=${RAW:-$WORK/raw}                                 # JSONL per domain (prepare_data.py)
export DATA=${DATA:-$WORK/data}                              # indexed datasets {math,code,wiki,seed}_{train,valid}
export OUT_DIR=${OUT_DIR:-$WORK/runs}                        # branches/<domain>/checkpoints, merged/, mix/
export ACCOUNT=${ACCOUNT:?set ACCOUNT (sbatch --account)}
export PARTITION=${PARTITION:?set PARTITION (sbatch --partition)}
