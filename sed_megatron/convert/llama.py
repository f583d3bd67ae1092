"""Llama-family checkpoints (Llama 3.x, Qwen2 / Qwen2.5, Mistral) between Hugging Face and Megatron-Core.

Three pieces, each with its inverse beside it:
  - the architecture: a transformers config <-> Megatron-LM flags (YAML `model:` keys);
  - the name map: which Hugging Face tensors make which Megatron tensor (one table);
  - the transforms: per-query-group QKV fusion, gate/up fusion, vocabulary padding.

Megatron fuses Q, K and V into one `linear_qkv` whose rows are grouped per query group:
[q heads of group 0, k of group 0, v of group 0, q heads of group 1, ...], so that a tensor
parallel split of the rows hands each rank whole groups. A plain cat([q, k, v]) is wrong as
soon as there is more than one group. SwiGLU's `linear_fc1` is cat([gate, up]).
"""

from dataclasses import dataclass

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


# ---------------------------------------------------------------- architecture

def _rope(config):
    """(theta, scaling dict or None) from a transformers config of any recent version."""
    params = getattr(config, "rope_parameters", None)
    if params:
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
        return float(theta), scaling
    return float(getattr(config, "rope_theta", 10000.0)), getattr(config, "rope_scaling", None)


# Megatron implements Llama-3 scaling with these constants; only the factor is a flag.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def megatron_flags_from_hf(config):
    """Megatron-LM flags (YAML keys) for a transformers Llama/Qwen2/Mistral config; ValueError if unsupported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (SwiGLU needs 'silu')")
    if getattr(config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported")
    if getattr(config, "use_sliding_window", False) or (model_type == "mistral" and getattr(config, "sliding_window", None)):
        raise ValueError("sliding-window attention is not supported")
    heads, groups = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta, scaling = _rope(config)
    if theta != int(theta):
        raise ValueError(f"rope_theta {theta} is not an integer, which Megatron's --rotary-base requires")
    flags = {
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.intermediate_size,
        "num_attention_heads": heads,
        "group_query_attention": groups != heads,
        "num_query_groups": groups,
        "kv_channels": head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "normalization": "RMSNorm",
        "norm_epsilon": config.rms_norm_eps,
        "swiglu": True,
        "disable_bias_linear": True,
        "add_qkv_bias": model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        "position_embedding_type": "rope",
        "rotary_base": int(theta),
        "rotary_percent": 1.0,
        "untie_embeddings_and_output_weights": not config.tie_word_embeddings,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
    }
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        fixed = {k: float(scaling.get(k, v)) for k, v in _LLAMA3_FIXED.items()}
        if kind != "llama3" or fixed != _LLAMA3_FIXED:
            raise ValueError(f"RoPE scaling {dict(scaling)} is not supported (only Llama-3 scaling with "
                             f"{_LLAMA3_FIXED})")
        flags.update(use_rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
    return flags


def hf_config_from_flags(flags, model_type, **extra):
    """The transformers config of a model described by Megatron flags (the inverse of the above)."""
    import transformers

    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}
    if model_type not in classes:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    rope = {"rope_type": "default", "rope_theta": float(flags["rotary_base"])}
    if flags.get("use_rope_scaling"):
        rope = {"rope_type": "llama3", "rope_theta": float(flags["rotary_base"]), "factor": flags["rope_scaling_factor"],
                **_LLAMA3_FIXED}
    kwargs = dict(
        vocab_size=flags["vocab_size"], hidden_size=flags["hidden_size"], intermediate_size=flags["ffn_hidden_size"],
        num_hidden_layers=flags["num_layers"], num_attention_heads=flags["num_attention_heads"],
        num_key_value_heads=flags["num_query_groups"], head_dim=flags["kv_channels"],
        max_position_embeddings=flags["max_position_embeddings"], rms_norm_eps=flags["norm_epsilon"],
        hidden_act="silu", tie_word_embeddings=not flags["untie_embeddings_and_output_weights"],
        rope_parameters=rope,
    )
    if model_type == "llama":
        kwargs["attention_bias"] = flags["add_qkv_bias"]
    if model_type == "mistral":
        kwargs["sliding_window"] = None  # full attention, as Megatron computes it
    elif flags["add_qkv_bias"] != (model_type == "qwen2"):
        raise ValueError(f"{model_type} with add_qkv_bias={flags['add_qkv_bias']} has no Hugging Face equivalent")
    kwargs.update(extra)
    return classes[model_type](**kwargs)


# ---------------------------------------------------------------- transforms

def fuse_qkv(q, k, v, num_groups):
    """[heads*d, ...], [groups*d, ...], [groups*d, ...] -> Megatron's per-group [(heads + 2 groups)*d, ...]."""
    rest = q.shape[1:]
    q = q.reshape(num_groups, -1, *rest)
    k = k.reshape(num_groups, -1, *rest)
    v = v.reshape(num_groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv, num_groups, num_heads, head_dim):
    """The inverse of fuse_qkv: (q, k, v)."""
    rest = qkv.shape[1:]
    per_group = qkv.reshape(num_groups, -1, *rest)
    q_rows = num_heads // num_groups * head_dim
    q, k, v = torch.split(per_group, [q_rows, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def fuse_gate_up(gate, up):
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1):
    return tuple(torch.chunk(fc1, 2, dim=0))


def pad_vocab(weight, padded_vocab_size):
    """Rows [V, h] -> [padded, h] with zero rows (never predicted: their logits are trained down)."""
    if weight.shape[0] == padded_vocab_size:
        return weight
    if weight.shape[0] > padded_vocab_size:
        raise ValueError(f"vocabulary of {weight.shape[0]} rows exceeds the padded size {padded_vocab_size}")
    return torch.cat([weight, weight.new_zeros(padded_vocab_size - weight.shape[0], *weight.shape[1:])])


def strip_vocab(weight, vocab_size):
    return weight[:vocab_size]


# ---------------------------------------------------------------- name map

@dataclass(frozen=True)
class Layout:
    """What the name map needs to know of the architecture."""

    num_layers: int
    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    tied: bool
    qkv_bias: bool
    te_names: bool = False
    """Transformer Engine layers fuse the layer norms into the next linear layer."""

    @classmethod
    def from_flags(cls, flags, padded_vocab_size=None, te_names=False):
        return cls(
            num_layers=flags["num_layers"], num_heads=flags["num_attention_heads"],
            num_groups=flags["num_query_groups"], head_dim=flags["kv_channels"], vocab_size=flags["vocab_size"],
            padded_vocab_size=padded_vocab_size or flags["vocab_size"],
            tied=not flags["untie_embeddings_and_output_weights"], qkv_bias=flags["add_qkv_bias"], te_names=te_names,
        )


def _layer_map(layout: Layout):
    """(Megatron suffix, Hugging Face suffixes, fuse, split) for one decoder layer."""
    norm_in = "self_attention.linear_qkv.layer_norm_weight" if layout.te_names else "input_layernorm.weight"
    norm_mlp = "mlp.linear_fc1.layer_norm_weight" if layout.te_names else "pre_mlp_layernorm.weight"
    qkv_fuse = lambda q, k, v: fuse_qkv(q, k, v, layout.num_groups)  # noqa: E731
    qkv_split = lambda t: split_qkv(t, layout.num_groups, layout.num_heads, layout.head_dim)  # noqa: E731
    same = (lambda t: t, lambda t: (t,))
    rows = [
        ("self_attention.linear_qkv.weight",
         ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), qkv_fuse, qkv_split),
        ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), *same),
        ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), fuse_gate_up, split_gate_up),
        ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), *same),
        (norm_in, ("input_layernorm.weight",), *same),
        (norm_mlp, ("post_attention_layernorm.weight",), *same),
    ]
    if layout.qkv_bias:
        rows.append(("self_attention.linear_qkv.bias",
                     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), qkv_fuse, qkv_split))
    return rows


def _global_map(layout: Layout):
    pad = lambda t: pad_vocab(t, layout.padded_vocab_size)  # noqa: E731
    strip = lambda t: (strip_vocab(t, layout.vocab_size),)  # noqa: E731
    rows = [
        ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), pad, strip),
        ("decoder.final_layernorm.weight", ("model.norm.weight",), lambda t: t, lambda t: (t,)),
    ]
    if not layout.tied:
        rows.append(("output_layer.weight", ("lm_head.weight",), pad, strip))
    return rows


def name_map(layout: Layout):
    """Every (Megatron name, Hugging Face names, fuse, split) of the model, layer by layer."""
    rows = list(_global_map(layout))
    for i in range(layout.num_layers):
        for mcore, hf, fuse, split in _layer_map(layout):
            rows.append((f"decoder.layers.{i}.{mcore}", tuple(f"model.layers.{i}.{n}" for n in hf), fuse, split))
    return rows


def hf_to_megatron(get_hf, layout: Layout):
    """Yield (Megatron name, tensor); get_hf(name) loads one Hugging Face tensor."""
    for mcore, hf_names, fuse, _ in name_map(layout):
        yield mcore, fuse(*(get_hf(name) for name in hf_names))


def megatron_to_hf(get_mcore, layout: Layout, only=None):
    """Yield (Hugging Face name, tensor); get_mcore(name) loads one Megatron tensor.

    only: the Megatron names to map (default: every one of the model)."""
    for mcore, hf_names, _, split in name_map(layout):
        if only is not None and mcore not in only:
            continue
        for name, tensor in zip(hf_names, split(get_mcore(mcore)), strict=True):
            yield name, tensor.contiguous()
