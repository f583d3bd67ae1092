"""Tiny Megatron-Core models for tests (parallel state must be initialized)."""

import torch


def tiny_model_config(vocab_size=96, max_sequence_length=32, transformer_engine=False):
    """The ModelConfig of tiny_gpt: 2 Llama-style layers (RMSNorm, SwiGLU, GQA, RoPE), hidden 32, untied."""
    from sed_megatron.models import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       kv_channels=8, vocab_size=vocab_size, padded_vocab_size=vocab_size,
                       max_position_embeddings=max_sequence_length, tied_embeddings=False,
                       transformer_impl="transformer_engine" if transformer_engine else "local")


def tiny_gpt(vocab_size=96, max_sequence_length=32, tp=1, seed=1234, transformer_engine=False):
    """A 2-layer Llama-style GPTModel (RMSNorm, SwiGLU, GQA, RoPE), identical at any TP (CPU init).

    transformer_engine=True: Transformer Engine layers in bf16 on the GPU (needs both)."""
    from megatron.core import tensor_parallel

    from sed_megatron.models import build_gpt_model

    model_cfg = tiny_model_config(vocab_size, max_sequence_length, transformer_engine)
    config = model_cfg.transformer_config(
        tensor_model_parallel_size=tp, params_dtype=torch.bfloat16 if transformer_engine else torch.float32,
        bf16=transformer_engine)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model = build_gpt_model(model_cfg, config)
    return model.cuda() if transformer_engine else model


def hf_to_megatron(get_hf, cfg, rows):
    """(Megatron name, tensor) of every row of a family's name map: what the converter writes, in
    memory; get_hf(name) loads one Hugging Face tensor."""
    for row in rows:
        yield row.megatron, row.to_megatron(cfg, get_hf)
