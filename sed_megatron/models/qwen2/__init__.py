"""Qwen2 / Qwen2.5 (incl. Math): Llama + QKV biases. Only the architecture map differs; the
name map (whose QKV bias rows follow ModelConfig.qkv_bias) and the layers are Llama's."""

import dataclasses

from ..llama import LLAMA
from ..registry import register
from . import config

QWEN2 = register(dataclasses.replace(
    LLAMA,
    name="qwen2",
    model_types=("qwen2",),
    architecture="Qwen2ForCausalLM",
    config_from_hf=config.config_from_hf,
    hf_config=config.hf_config,
))
