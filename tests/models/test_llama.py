"""Llama and Mistral specifics: what converts, what is refused with the field named."""

import pytest

from sed_megatron.models import family_for
from sed_megatron.testing.tiny_hf import tiny_hf_config


def test_llama3_rope_scaling_carries_over():
    cfg = family_for("llama").config_from_hf(tiny_hf_config("llama_rope_scaling"))
    assert cfg.rope_scaling_factor == 32.0 and cfg.rotary_base == 500000
    flags = cfg.to_megatron_flags()
    assert flags["use_rope_scaling"] and flags["rope_scaling_factor"] == 32.0
    rope = family_for("llama").hf_config(cfg).rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0 and rope["original_max_position_embeddings"] == 8192


def test_explicit_head_dim_carries_over():
    cfg = family_for("llama").config_from_hf(tiny_hf_config("llama_gqa_tied"))
    assert cfg.kv_channels == 16 and cfg.hidden_size // cfg.num_attention_heads == 16  # the tiny models agree
    config = tiny_hf_config("llama_gqa_tied")
    config.head_dim = 8  # Megatron's kv_channels need not be hidden / heads
    assert family_for("llama").config_from_hf(config).kv_channels == 8


@pytest.mark.parametrize("variant,change,message", [
    ("llama_gqa_untied", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ("llama_gqa_untied", {"mlp_bias": True}, "mlp_bias=True is not supported"),
    ("llama_gqa_untied", {"attention_bias": True}, "attention_bias=True is not supported"),
    ("llama_gqa_untied", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
     "RoPE scaling .* is not supported"),
    ("llama_gqa_untied", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.5}},
     "rope_theta 10000.5 is not an integer"),
    ("mistral", {"sliding_window": 4096}, "sliding-window attention \\(sliding_window=4096\\) is not supported"),
])
def test_unconvertible_configs_are_refused(variant, change, message):
    config = tiny_hf_config(variant)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message):
        family_for(config.model_type).config_from_hf(config)


def test_a_model_config_llama_cannot_express_is_refused():
    cfg = family_for("llama").config_from_hf(tiny_hf_config("llama_gqa_tied"))
    for family in ("llama", "mistral"):
        with pytest.raises(ValueError, match=f"ModelConfig.qkv_bias=True: a {family} model needs False"):
            family_for(family).hf_config(cfg.replace(qkv_bias=True))
    with pytest.raises(ValueError, match="ModelConfig.qk_layernorm=True: a llama model needs False"):
        family_for("llama").hf_config(cfg.replace(qk_layernorm=True))
    with pytest.raises(ValueError, match="ModelConfig.num_experts=4: a llama model needs None"):
        family_for("llama").hf_config(cfg.replace(num_experts=4))


def test_mistral_is_llama_under_another_name():
    llama, mistral = family_for("llama"), family_for("mistral")
    assert mistral.mappings is llama.mappings and mistral.block_spec is llama.block_spec
    config = tiny_hf_config("mistral")
    assert mistral.hf_config(mistral.config_from_hf(config)).sliding_window is None
