"""Evaluation of any checkpoint, at any TP/PP/EP layout, through the training step.

- :mod:`.loading`: ``--load PATH`` -> a model in eval mode (the one config builder and the one
  tokenizer look-up of every evaluation; DCP files verified before anything is read).
- :mod:`.perplexity`: per-domain loss and perplexity, forced/oracle routing of a merged MoE.
- :mod:`.btm`: the Branch-Train-Merge ensemble baseline (tf-idf routing over branch models).
- :mod:`.routing`: per-layer routing statistics of an MoE and their heatmaps.
- :mod:`.report`: the results table and figures of an experiment.
- :mod:`.harness`: lm-evaluation-harness model adapter (registered as ``btx-megatron``),
  the ``btx-paper`` suite and the built-in offline tasks (:mod:`.tasks`).
- :mod:`.generation`: text generation (greedy, temperature/top-p sampling, stop sequences).

Submodules import Megatron-Core (and lm-eval) only when used; import them directly.
"""
