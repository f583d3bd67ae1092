"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (QK-norm) with every MLP replaced
by routed experts (softmax router, top-k, `norm_topk_prob`; no shared expert). The architecture
map, the MLP rows of the name map and the checkpoint key of the local MoE layers' norm are its
own; the layers are Megatron's standard GPT block, whose MoE layers follow the TransformerConfig
(num_moe_experts)."""

import dataclasses

from ..qwen3 import QWEN3
from ..registry import register
from . import config, mapping, spec

QWEN3_MOE = register(dataclasses.replace(
    QWEN3,
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    architecture="Qwen3MoeForCausalLM",
    config_from_hf=config.config_from_hf,
    hf_config=config.hf_config,
    mappings=mapping.mappings,
    stored_mappings=mapping.stored_mappings,
    block_spec=spec.block_spec,
))
