"""Qwen3 architecture: a transformers Qwen3Config <-> ModelConfig.

Qwen3 is Llama with QK-norm (`q_norm`/`k_norm`: an RMSNorm over each head's head_dim, with the
model's rms_norm_eps, before RoPE; Megatron's qk_layernorm), no QKV bias, an explicit head_dim
(Megatron's kv_channels; Qwen3-8B: 128 with hidden 4096 and 32 heads, Qwen3-30B-A3B: 128 with
hidden 2048 and 32 heads), RoPE theta 1e6, tied (0.6B-4B) or untied (8B and up) embeddings.
Its optional sliding window is not converted (Megatron attends to every earlier position).
"""

from ..llama.config import check_expressible, llama_hf_kwargs
from ..llama.config import config_from_hf as llama_config_from_hf


def config_from_hf(config):
    """ModelConfig of a Qwen3Config (or of a Qwen3-MoE config's attention and embeddings)."""
    if getattr(config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=true is not supported: Megatron attends to every earlier position")
    return llama_config_from_hf(config).replace(qk_layernorm=True)  # attention_bias=true is refused there


def hf_config(cfg, **extra):
    """The transformers Qwen3Config of a ModelConfig (the inverse of config_from_hf)."""
    from transformers import AutoConfig

    check_expressible(cfg, "qwen3", qkv_bias=False, qk_layernorm=True)
    return AutoConfig.for_model("qwen3", **llama_hf_kwargs(cfg), use_sliding_window=False, **extra)
