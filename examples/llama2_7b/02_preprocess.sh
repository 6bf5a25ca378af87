#!/bin/bash
# Step 2b: tokenise every domain with the seed's tokenizer into Megatron indexed datasets.
#   source examples/llama2_7b/env.sh && sbatch -A "$ACCOUNT" -p "$PARTITION" -N 1 -c 64 examples/llama2_7b/02_preprocess.sh
set -euo pipefail
mkdir -p "$DATA"
for domain in math code wiki seed; do
    for split in train valid; do
        python tools/preprocess_data.py --input "$RAW/${domain}_${split}.jsonl" --output-prefix "$DATA/${domain}_${split}" \
            --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
            --append-eod --workers "${SLURM_CPUS_PER_TASK:-32}"
    done
done
