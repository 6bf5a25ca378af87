"""config.json <-> ModelConfig mapping (pure; no models)."""

from __future__ import annotations

import pytest

from btx_megatron.config import ModelConfig
from btx_megatron.convert.hf_config import (
    exported_topk,
    hf_config_from_model,
    model_config_from_hf,
    model_flags,
)

import torch

MISTRAL = {
    "architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
    "vocab_size": 300, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
}


def test_mistral_fields_head_dim_and_sliding_window_note():
    m, arch, notes = model_config_from_hf(MISTRAL)
    assert arch == "MistralForCausalLM"
    assert (m.num_query_groups, m.kv_channels, m.head_dim, m.rotary_base, m.norm_epsilon) == (1, 32, 32, 1000000, 1e-6)
    assert m.seq_length == 4096 and m.max_position_embeddings == 32768
    assert m.padded_vocab_size == 384 and m.untie_embeddings_and_output_weights
    assert any("sliding_window 4096" in n for n in notes)


def test_v5_rope_parameters_and_refusals():
    v5 = {k: v for k, v in MISTRAL.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    assert model_config_from_hf(v5)[0].rotary_base == 500000
    with pytest.raises(ValueError, match="RoPE scaling 'llama3' is not supported"):
        model_config_from_hf({**MISTRAL, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
        model_config_from_hf({**v5, "rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}})
    with pytest.raises(ValueError, match="attention_bias=true"):
        model_config_from_hf({**MISTRAL, "attention_bias": True})
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        model_config_from_hf({**MISTRAL, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="'Qwen2ForCausalLM'.*supported: LlamaForCausalLM"):
        model_config_from_hf({**MISTRAL, "architectures": ["Qwen2ForCausalLM"]})


def test_hf_config_round_trip_and_flags():
    m, _, _ = model_config_from_hf({**MISTRAL, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8,
                                    "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02})
    out = hf_config_from_model(m, torch.bfloat16, special_tokens={"bos_token_id": 1, "eos_token_id": 2})
    assert out["architectures"] == ["MixtralForCausalLM"] and out["torch_dtype"] == "bfloat16"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps"):
        assert out[key] == MISTRAL[key], key
    assert (out["num_local_experts"], out["num_experts_per_tok"], out["router_aux_loss_coef"]) == (8, 2, 0.02)
    assert out["rope_theta"] == 1e6 and out["bos_token_id"] == 1
    from btx_megatron.config import parse_config

    cfg, _ = parse_config(model_flags(m) + ["--seq-length", "128"])
    assert cfg.model.architecture() == m.architecture() and cfg.model.num_experts == 8


def test_router_export_policy():
    base = dict(num_experts=4, swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
                disable_bias_linear=True)
    assert exported_topk(ModelConfig(**base, moe_router_topk=2), False, "x") == (2, None)
    for router, k in (("soft", 4), ("sample-top1", 1), ("switch", 1)):
        m = ModelConfig(**base, moe_router_type=router)
        with pytest.raises(ValueError, match=f"{router}.*--allow-approximate-router"):
            exported_topk(m, False, "--load x")
        got, note = exported_topk(m, True, "--load x")
        assert got == k and router in note
