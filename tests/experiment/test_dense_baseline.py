"""The dense baseline's budget: compute-matched (as many training FLOPs as branches + mix, the
default) or data-matched (as many tokens, the paper's dense baseline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from btx_megatron.config.experiment import ExperimentError
from btx_megatron.experiment import load_pipeline
from btx_megatron.training.metrics import flops_per_token

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "examples" / "tiny" / "experiment.yaml"


@pytest.mark.parametrize("match", ["compute", "data"])
def test_dense_baseline_matches_the_compute_or_the_tokens_of_branches_and_mix(tmp_path, monkeypatch, match):
    p = load_pipeline(str(EXPERIMENT), output=str(tmp_path / "run"), data_dir=str(tmp_path / "data"),
                      overrides={"baselines.dense.match": match, "model.vocab_size": 1024}, echo=lambda s: None)
    dense_model = p.plans["math"].config.model
    seq = dense_model.seq_length
    # What the branches and the mix phase report (eval_summary.json): a mix token costs 1.5 dense ones.
    for name, cost in [*((n, 1.0) for n in p.branch_names), ("mix", 1.5)]:
        plan = p.plans[name]
        plan.save_dir.mkdir(parents=True)
        tokens = plan.target_iters * plan.tokens_per_iter
        summary = {"tokens": tokens, "flops": tokens * cost * flops_per_token(dense_model, seq)}
        (plan.save_dir / "eval_summary.json").write_text(json.dumps(summary))
    started = []
    monkeypatch.setattr(p, "_train_stage", lambda stage, group, plan, inputs: started.append(plan) or {})
    p.stage_dense({})
    dense = started[0]
    branch_iters = sum(p.plans[n].target_iters for n in p.branch_names)        # 3 x 250
    mix_iters = p.plans["mix"].target_iters                                      # 150
    assert dense.tokens_per_iter == p.plans["mix"].tokens_per_iter == p.plans["math"].tokens_per_iter
    expected = branch_iters + mix_iters if match == "data" else branch_iters + round(1.5 * mix_iters)
    assert dense.target_iters == expected                                        # 900 / 975


def test_dense_match_must_be_compute_or_data(tmp_path):
    with pytest.raises(ExperimentError, match="baselines.dense.match: 'flops' is not 'compute'"):
        load_pipeline(str(EXPERIMENT), output=str(tmp_path / "run"), overrides={"baselines.dense.match": "flops"},
                      echo=lambda s: None)
