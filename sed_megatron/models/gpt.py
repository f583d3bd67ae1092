"""GPT-family models (Llama 3.x, Qwen2 / Qwen2.5, Mistral) as Megatron-Core GPTModels.

The architecture comes from Megatron-LM's flags (or the YAML `model:` section): RMSNorm
(`normalization: RMSNorm`), SwiGLU (`swiglu`), RoPE (`position_embedding_type: rope`,
`rotary_base`, Llama-3 scaling with `use_rope_scaling` / `rope_scaling_factor`), GQA
(`group_query_attention`, `num_query_groups`), QKV bias (`add_qkv_bias` with
`disable_bias_linear`), tied or untied embeddings (`untie_embeddings_and_output_weights`).
"""

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec


def transformer_engine_available():
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # an absent or broken install both mean "use the local layers"
        return False
    return True


def gpt_layer_spec(args):
    """Transformer Engine layers when asked for (--transformer-impl transformer_engine), else local."""
    if args.transformer_impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_layernorm)
    return get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=args.qk_layernorm)


def build_gpt_model(args, transformer_config, pre_process=True, post_process=True, vp_stage=None, pg_collection=None):
    """The GPTModel of one pipeline stage (Megatron's model_provider contract)."""
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=gpt_layer_spec(args),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # logits stay vocab-parallel: the loss works on the shards
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
