#!/bin/bash
# Step 6: export the BTX model as a Hugging Face Mixtral checkpoint and run the paper's tasks
# with lm-evaluation-harness (pip install lm-eval[math]). One 8-GPU node.
#   source examples/llama2_7b/env.sh && bash examples/llama2_7b/06_export_eval.sh
set -euo pipefail
HF_OUT=${HF_OUT:-$WORK/hf/btx-4x7b}
python tools/convert_hf.py export --load "$OUT_DIR/mix/checkpoints" --output "$HF_OUT" \
    --tokenizer-dir "$HF_LLAMA" --dtype bfloat16
MODEL="pretrained=$HF_OUT,dtype=bfloat16,parallelize=True"
EVAL_OUT=${EVAL_OUT:-$WORK/eval/btx-4x7b}
run() {  # shots, tasks
    lm_eval --model hf --model_args "$MODEL" --tasks "$2" --num_fewshot "$1" --batch_size auto \
        --output_path "$EVAL_OUT" --log_samples "${@:3}"
}
run 8 gsm8k                                    # math reasoning (8-shot, exact match)
run 4 minerva_math                             # MATH (4-shot)
run 0 humaneval --confirm_run_unsafe_code      # code (pass@1, executes generated code: sandbox it)
run 3 mbpp --confirm_run_unsafe_code
run 5 nq_open,triviaqa                         # world knowledge
run 5 mmlu
run 0 arc_easy,arc_challenge,hellaswag,winogrande,piqa,siqa   # commonsense reasoning
# The same commands with pretrained=$HF_LLAMA give the seed's row; export the dense baseline and
# each branch the same way (they export as LlamaForCausalLM).
