"""Qwen2 / Qwen2.5 architecture: Llama with QKV biases (and an optional sliding window, not converted)."""

from ..llama.config import check_expressible, llama_hf_kwargs
from ..llama.config import config_from_hf as llama_config_from_hf


def config_from_hf(config):
    if getattr(config, "use_sliding_window", False):
        raise ValueError("sliding-window attention (use_sliding_window=true) is not supported: "
                         "Megatron attends to every earlier position")
    return llama_config_from_hf(config).replace(qkv_bias=True)


def hf_config(cfg, **extra):
    from transformers import AutoConfig

    check_expressible(cfg, "qwen2", qkv_bias=True)
    return AutoConfig.for_model("qwen2", **llama_hf_kwargs(cfg), **extra)
