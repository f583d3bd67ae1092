"""Llama 3.x (and Mistral) architecture: a transformers config <-> ModelConfig.

Llama is Megatron's standard GPT layer: RMSNorm, SwiGLU, RoPE (Llama-3 scaling optional),
grouped-query attention, no linear biases, tied or untied embeddings (Llama's
`attention_bias` biases o_proj as well as q/k/v, which Megatron cannot express). Mistral is
the same model with an optional sliding window, which Megatron does not implement (only full
attention converts).
"""

from ..config import LLAMA3_ROPE_CONSTANTS, ModelConfig, padded_vocab_size


def rope_from_hf(config):
    """(theta, scaling dict or None) from a transformers config of any recent version."""
    params = getattr(config, "rope_parameters", None)
    if params:
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
        return float(theta), scaling
    return float(getattr(config, "rope_theta", 10000.0)), getattr(config, "rope_scaling", None)


def config_from_hf(config):
    """ModelConfig of a Llama-style transformers config; ValueError naming what cannot convert."""
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (SwiGLU needs 'silu')")
    if getattr(config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported")
    if getattr(config, "attention_bias", False):  # q, k, v *and* o biases: Megatron biases QKV alone or every linear
        raise ValueError("attention_bias=True is not supported (Megatron has no output-projection-only bias)")
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta, scaling = rope_from_hf(config)
    if theta != int(theta):
        raise ValueError(f"rope_theta {theta} is not an integer, which Megatron's --rotary-base requires")
    factor = None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        fixed = {k: float(scaling.get(k, v)) for k, v in LLAMA3_ROPE_CONSTANTS.items()}
        if kind != "llama3" or fixed != LLAMA3_ROPE_CONSTANTS:
            raise ValueError(f"RoPE scaling {dict(scaling)} is not supported (only Llama-3 scaling with "
                             f"{LLAMA3_ROPE_CONSTANTS})")
        factor = float(scaling["factor"])
    return ModelConfig(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        vocab_size=config.vocab_size,
        padded_vocab_size=padded_vocab_size(config.vocab_size),
        max_position_embeddings=config.max_position_embeddings,
        normalization="RMSNorm",
        norm_epsilon=config.rms_norm_eps,
        swiglu=True,
        add_bias_linear=False,
        qkv_bias=False,
        position_embedding_type="rope",
        rotary_base=int(theta),
        rope_scaling_factor=factor,
        tied_embeddings=bool(config.tie_word_embeddings),
        model_type=config.model_type,
    )


def check_expressible(cfg, family_name, **required):
    """ValueError naming the first ModelConfig field whose value the family's HF config cannot carry.

    required: field -> the value the family needs, beside the Llama layer's own."""
    needs = dict(normalization="RMSNorm", swiglu=True, add_bias_linear=False, qk_layernorm=False,
                 position_embedding_type="rope", rotary_percent=1.0, rotary_seq_len_interpolation_factor=None,
                 num_experts=None)
    needs.update(required)
    for field, value in needs.items():
        if getattr(cfg, field) != value:
            raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)!r}: a {family_name} model needs {value!r}")


def llama_hf_kwargs(cfg):
    """transformers config arguments shared by Llama-style families."""
    rope = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    if cfg.rope_scaling_factor is not None:
        rope = {"rope_type": "llama3", "rope_theta": float(cfg.rotary_base), "factor": cfg.rope_scaling_factor,
                **LLAMA3_ROPE_CONSTANTS}
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
        hidden_act="silu", tie_word_embeddings=cfg.tied_embeddings, rope_parameters=rope,
    )


def hf_config(cfg, **extra):
    """The transformers LlamaConfig of a ModelConfig (the inverse of config_from_hf)."""
    from transformers import AutoConfig

    check_expressible(cfg, "llama", qkv_bias=False)
    return AutoConfig.for_model("llama", **llama_hf_kwargs(cfg), **extra)


def mistral_config_from_hf(config):
    if getattr(config, "sliding_window", None):
        raise ValueError(f"sliding-window attention (sliding_window={config.sliding_window}) is not supported: "
                         f"Megatron attends to every earlier position")
    return config_from_hf(config)


def mistral_hf_config(cfg, **extra):
    from transformers import AutoConfig

    check_expressible(cfg, "mistral", qkv_bias=False)
    return AutoConfig.for_model("mistral", **llama_hf_kwargs(cfg), sliding_window=None, **extra)
