"""Qwen3 (dense): Llama + a per-head RMSNorm on queries and keys (QK-norm), no QKV bias, and a
head_dim that need not be hidden / heads. The architecture map and two rows of the name map
differ; the layers are Llama's (Megatron's standard GPT block with qk_layernorm)."""

import dataclasses

from ..llama import LLAMA
from ..registry import register
from . import config, mapping

QWEN3 = register(dataclasses.replace(
    LLAMA,
    name="qwen3",
    model_types=("qwen3",),
    architecture="Qwen3ForCausalLM",
    config_from_hf=config.config_from_hf,
    hf_config=config.hf_config,
    mappings=mapping.mappings,
))
