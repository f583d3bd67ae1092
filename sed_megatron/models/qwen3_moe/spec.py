"""Qwen3-MoE's layers: Megatron's standard GPT decoder block, whose layers are MoE layers by the
TransformerConfig (num_moe_experts, moe_layer_freq 1), with one change to the local layers.

Megatron's local layer stores its pre-MLP norm under the name of Transformer Engine's fused
norm+fc1 (`mlp.linear_fc1.layer_norm_weight`), but an MoE layer has no fused fc1: with
Transformer Engine that norm is a module of its own, stored as `pre_mlp_layernorm.weight`. The
local MoE layers here store it under that same key, so that a checkpoint converted or trained
with either implementation loads with the other (and exports through the local model).
"""

import dataclasses

from ..gpt import gpt_block_spec

_FUSED_NORM_KEY = "pre_mlp_layernorm."


def block_spec(model_cfg, transformer_config, vp_stage=None, pp_rank=None):
    """The decoder layers of one pipeline stage (get_gpt_decoder_block_spec), MoE norms keyed as TE keys them."""
    spec = gpt_block_spec(model_cfg, transformer_config, vp_stage, pp_rank)
    layers = []
    for layer in spec.layer_specs:
        keys = getattr(layer.submodules, "sharded_state_dict_keys_map", None) or {}
        if _FUSED_NORM_KEY in keys:
            keys = {k: v for k, v in keys.items() if k != _FUSED_NORM_KEY}
            layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules,
                                                                              sharded_state_dict_keys_map=keys))
        layers.append(layer)
    return dataclasses.replace(spec, layer_specs=layers)
