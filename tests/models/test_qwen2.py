"""Qwen2: Llama + QKV biases; only the architecture map differs."""

import pytest

from sed_megatron.models import family_for
from sed_megatron.testing.tiny_hf import tiny_hf_config, tiny_hf_model


def test_qwen2_overrides_only_the_architecture_map():
    qwen2, llama = family_for("qwen2"), family_for("llama")
    assert qwen2.mappings is llama.mappings and qwen2.block_spec is llama.block_spec
    assert qwen2.config_from_hf is not llama.config_from_hf


def test_qkv_bias_rows_exist_only_with_qkv_bias():
    qwen2 = family_for("qwen2")
    cfg = qwen2.config_from_hf(tiny_hf_config("qwen2_bias"))
    assert cfg.qkv_bias
    rows = {row.megatron: row.hf for row in qwen2.rows(cfg)}
    assert rows["decoder.layers.1.self_attention.linear_qkv.bias"] == tuple(
        f"model.layers.1.self_attn.{p}_proj.bias" for p in "qkv")
    hf_names = {n for names in rows.values() for n in names}
    assert hf_names == set(tiny_hf_model("qwen2_bias").state_dict())  # every HF tensor, nothing more
    assert not any(name.endswith(".bias") for name, _, _ in family_for("llama").rows(cfg.replace(qkv_bias=False)))


def test_sliding_window_and_bias_free_configs_are_refused():
    config = tiny_hf_config("qwen2_bias")
    config.use_sliding_window = True
    with pytest.raises(ValueError, match="use_sliding_window=true"):
        family_for("qwen2").config_from_hf(config)
    cfg = family_for("qwen2").config_from_hf(tiny_hf_config("qwen2_bias"))
    with pytest.raises(ValueError, match="ModelConfig.qkv_bias=False: a qwen2 model needs True"):
        family_for("qwen2").hf_config(cfg.replace(qkv_bias=False))
