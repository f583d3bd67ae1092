"""The GPTModel of one pipeline stage, built from a typed ModelConfig.

    model = build_gpt_model(model_cfg, model_cfg.transformer_config(), pre_process=True, post_process=True)

The layers come from the model's family (its `block_spec`, by model_cfg.model_type) or, for a
model defined by Megatron flags alone, from Megatron's standard GPT decoder block
(`get_gpt_decoder_block_spec`): dense and MoE layers alike follow the TransformerConfig
(`num_moe_experts`, `moe_layer_freq`), so an MoE family needs no change here. The
TransformerConfig carries the runtime settings (parallel sizes, dtypes, fusions); it must agree
with the ModelConfig on the architecture, which is checked.
"""

import dataclasses


def gpt_block_spec(model_cfg, transformer_config, vp_stage=None, pp_rank=None):
    """Megatron's standard GPT decoder block of one pipeline stage (Transformer Engine or local layers).

    pp_rank: the pipeline rank the stage belongs to (None: Megatron's global parallel state)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    use_te = model_cfg.transformer_impl == "transformer_engine"
    spec = get_gpt_decoder_block_spec(transformer_config, use_transformer_engine=use_te,
                                      normalization=model_cfg.normalization, vp_stage=vp_stage, pp_rank=pp_rank)
    if not use_te and model_cfg.normalization == "RMSNorm":
        # The local layers' RMSNorm is torch's; Megatron would give the final norm apex's
        # FusedLayerNorm whenever apex is importable, which has no RMSNorm.
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        spec = dataclasses.replace(spec, layer_norm=WrappedTorchNorm)
    return spec


def check_agrees(model_cfg, transformer_config):
    """ValueError naming the first field on which the two configs describe different models."""
    from .megatron_fields import check_agrees as agree

    agree(model_cfg, transformer_config)


def decoder_block_spec(model_cfg, transformer_config, vp_stage=None, pp_rank=None):
    """The layer specs of one stage: the family's, or the standard GPT block without a model_type.

    With the local layers, sequence and context parallelism swap in our SP-capable norms and
    CP-capable core attention (models/layers), whatever the family; Transformer Engine's
    layers do both themselves."""
    if model_cfg.model_type is None:
        spec = gpt_block_spec(model_cfg, transformer_config, vp_stage, pp_rank)
    else:
        from .registry import family_for

        spec = family_for(model_cfg.model_type).block_spec(model_cfg, transformer_config, vp_stage, pp_rank)
    if model_cfg.transformer_impl == "local":
        from .layers import local_parallel_layers

        spec = local_parallel_layers(spec, transformer_config)
    return spec


def build_gpt_model(model_cfg, transformer_config, pre_process=True, post_process=True, vp_stage=None,
                    pg_collection=None):
    """The GPTModel of one pipeline stage (Megatron's model_provider contract).

    Logits stay vocab-parallel ([b, s, padded_vocab/tp]): the loss works on the shards."""
    from megatron.core.models.gpt import GPTModel

    check_agrees(model_cfg, transformer_config)
    pp_rank = None
    if pg_collection is not None and getattr(pg_collection, "pp", None) is not None:
        from megatron.core.utils import get_pg_rank

        pp_rank = get_pg_rank(pg_collection.pp)
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=decoder_block_spec(model_cfg, transformer_config, vp_stage, pp_rank),
        vocab_size=model_cfg.padded_vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tied_embeddings,
        position_embedding_type=model_cfg.position_embedding_type,
        rotary_percent=model_cfg.rotary_percent,
        rotary_base=model_cfg.rotary_base,
        rope_scaling=model_cfg.rope_scaling_factor is not None,
        rope_scaling_factor=model_cfg.rope_scaling_factor or 8.0,  # Megatron's default; unused without scaling
        seq_len_interpolation_factor=model_cfg.rotary_seq_len_interpolation_factor,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
