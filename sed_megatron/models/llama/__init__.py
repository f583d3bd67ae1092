"""Llama 3.x and Mistral (the same layers; Mistral without QKV biases or a sliding window)."""

import dataclasses

from ..registry import Family, register
from . import config, mapping, spec

LLAMA = register(Family(
    name="llama",
    model_types=("llama",),
    architecture="LlamaForCausalLM",
    config_from_hf=config.config_from_hf,
    hf_config=config.hf_config,
    mappings=mapping.mappings,
    block_spec=spec.block_spec,
))

MISTRAL = register(dataclasses.replace(
    LLAMA,
    name="mistral",
    model_types=("mistral",),
    architecture="MistralForCausalLM",
    config_from_hf=config.mistral_config_from_hf,
    hf_config=config.mistral_hf_config,
))
