"""Tiny Megatron-Core models for tests (parallel state must be initialized)."""

import torch


def tiny_gpt(vocab_size=96, max_sequence_length=32, tp=1, seed=1234, transformer_engine=False):
    """A 2-layer Llama-style GPTModel (RMSNorm, SwiGLU, GQA, RoPE), identical at any TP (CPU init).

    transformer_engine=True: Transformer Engine layers in bf16 on the GPU (needs both)."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, use_cpu_initialization=True,
        params_dtype=torch.bfloat16 if transformer_engine else torch.float32, bf16=transformer_engine,
        gradient_accumulation_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, masked_softmax_fusion=False,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    if transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    model = GPTModel(config, spec, vocab_size=vocab_size, max_sequence_length=max_sequence_length,
                     position_embedding_type="rope")
    return model.cuda() if transformer_engine else model
