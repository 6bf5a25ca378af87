#!/bin/bash
# Step 1: import Llama-2 7B from Hugging Face as the dense seed checkpoint (one CPU host, ~30 GB RAM).
#   source examples/llama2_7b/env.sh && bash examples/llama2_7b/01_import_seed.sh
set -euo pipefail
python tools/convert_hf.py import --hf-dir "$HF_LLAMA" --output "$SEED_CKPT" --seq-length 4096 --dtype bfloat16
cat "$SEED_CKPT/model_args.txt"     # the model flags every later stage must use (checked at load)
