"""ModelConfig <-> Megatron-LM flags <-> Megatron's parsed args <-> TransformerConfig: one table.

    flags = to_flags(cfg)                          # the YAML `model:` keys a model file stores
    cfg = from_flags(flags, padded_vocab_size)     # a model file, absent keys at Megatron's defaults
    cfg = from_args(args)                          # Megatron's validated args (the training provider)
    kwargs = transformer_config_kwargs(cfg)        # a TransformerConfig of this architecture
    check_agrees(cfg, transformer_config)          # the two describe the same model, or ValueError

Each row of FIELDS is one ModelConfig field: the flags that carry it (as YAML keys: a flag's name
with "_" for "-"), how its value becomes them and back, and the TransformerConfig attribute that
holds it. Every direction above is generated from the rows; a new architecture field is one row.
Three names may differ for one setting, which is why this table exists: `--norm-epsilon` is the
YAML key `norm_epsilon`, Megatron's args attribute `layernorm_epsilon` (ARGS_ATTRIBUTES) and the
TransformerConfig's `layernorm_epsilon`; `--disable-bias-linear` is stored negated, as the
TransformerConfig's `add_bias_linear`.
"""

from dataclasses import dataclass
from typing import Callable

FIXED_FLAGS = {"attention_dropout": 0.0, "hidden_dropout": 0.0}
"""Flags a model file always holds with these values: models are fine-tuned as pre-trained (Megatron's dropout is 0.1)."""
MOE_FIXED_FLAGS = {"moe_router_load_balancing_type": "aux_loss"}
"""The same, for models with experts."""
MEGATRON_DEFAULTS = {
    "group_query_attention": False, "num_query_groups": None, "kv_channels": None, "normalization": "LayerNorm",
    "norm_epsilon": 1e-5, "swiglu": False, "disable_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": False,
    "position_embedding_type": "learned_absolute", "rotary_base": 10000, "rotary_percent": 1.0,
    "use_rope_scaling": False, "rope_scaling_factor": 8.0, "rotary_seq_len_interpolation_factor": None,
    "untie_embeddings_and_output_weights": False, "num_experts": None, "moe_ffn_hidden_size": None,
    "moe_router_topk": 2, "moe_router_pre_softmax": False, "moe_aux_loss_coeff": 0.0,
}
"""Megatron-LM's parser defaults of the flags a model file may leave out (an earlier converter did)."""
REQUIRED_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                  "max_position_embeddings")
ARGS_ATTRIBUTES = {"norm_epsilon": "layernorm_epsilon", "disable_bias_linear": "add_bias_linear"}
"""YAML key -> Megatron's args attribute where they differ (disable_bias_linear's is stored negated:
its option is store_false); tests/models/test_config.py holds this against Megatron's parser."""


@dataclass(frozen=True)
class Field:
    """One ModelConfig field: its flags (YAML keys), its TransformerConfig attribute, and the transforms."""

    name: str
    """The ModelConfig field."""
    flags: tuple = ()
    """The flags (YAML `model:` keys) that carry it; () for a field that travels beside them."""
    transformer: str | None = None
    """The TransformerConfig attribute that holds the same value, or None."""
    write: Callable | None = None
    """value, cfg -> {flag: value}; default {flags[0]: value}."""
    read: Callable | None = None
    """get (flag -> value) -> the field's value; default get(flags[0])."""
    moe: bool = False
    """Written only for a model with experts."""
    agrees: bool = True
    """Held against the TransformerConfig by check_agrees (a value Megatron may hold in another form: no)."""

    def to_flags(self, cfg):
        if not self.flags or (self.moe and cfg.num_experts is None):
            return {}
        value = getattr(cfg, self.name)
        return self.write(value, cfg) if self.write else {self.flags[0]: value}

    def from_flags(self, get):
        return self.read(get) if self.read else get(self.flags[0])


def _num_query_groups(get):
    groups = get("num_query_groups") if get("group_query_attention") else None
    return groups or get("num_attention_heads")


def _moe_aux_loss_coeff(get):
    # Megatron takes one coefficient per load-balancing type too; a list is not this model's business.
    value = get("moe_aux_loss_coeff")
    return 0.0 if not get("num_experts") or isinstance(value, list) else float(value)


def _if_moe(flag, cast=None):
    def read(get):
        value = get(flag) if get("num_experts") else MEGATRON_DEFAULTS[flag]
        return cast(value) if cast is not None and value is not None else value
    return read


FIELDS = (
    Field("num_layers", ("num_layers",), "num_layers"),
    Field("hidden_size", ("hidden_size",), "hidden_size"),
    Field("ffn_hidden_size", ("ffn_hidden_size",), "ffn_hidden_size"),
    Field("num_attention_heads", ("num_attention_heads",), "num_attention_heads"),
    Field("num_query_groups", ("group_query_attention", "num_query_groups"), "num_query_groups",
          write=lambda v, cfg: {"group_query_attention": v != cfg.num_attention_heads, "num_query_groups": v},
          read=_num_query_groups),
    Field("kv_channels", ("kv_channels",), "kv_channels",
          read=lambda get: get("kv_channels") or get("hidden_size") // get("num_attention_heads")),
    Field("vocab_size", ("vocab_size",)),
    Field("padded_vocab_size"),
    Field("max_position_embeddings", ("max_position_embeddings",)),
    Field("normalization", ("normalization",), "normalization"),
    Field("norm_epsilon", ("norm_epsilon",), "layernorm_epsilon", read=lambda get: float(get("norm_epsilon"))),
    Field("swiglu", ("swiglu",), "gated_linear_unit", read=lambda get: bool(get("swiglu"))),
    Field("add_bias_linear", ("disable_bias_linear",), "add_bias_linear",
          write=lambda v, cfg: {"disable_bias_linear": not v}, read=lambda get: not get("disable_bias_linear")),
    Field("qkv_bias", ("add_qkv_bias",), "add_qkv_bias", read=lambda get: bool(get("add_qkv_bias"))),
    Field("qk_layernorm", ("qk_layernorm",), "qk_layernorm", write=lambda v, cfg: {"qk_layernorm": True} if v else {},
          read=lambda get: bool(get("qk_layernorm"))),
    Field("position_embedding_type", ("position_embedding_type",)),
    Field("rotary_base", ("rotary_base",)),
    Field("rotary_percent", ("rotary_percent",), read=lambda get: float(get("rotary_percent"))),
    Field("rope_scaling_factor", ("use_rope_scaling", "rope_scaling_factor"),
          write=lambda v, cfg: {} if v is None else {"use_rope_scaling": True, "rope_scaling_factor": v},
          read=lambda get: float(get("rope_scaling_factor")) if get("use_rope_scaling") else None),
    Field("rotary_seq_len_interpolation_factor", ("rotary_seq_len_interpolation_factor",),
          write=lambda v, cfg: {} if v is None else {"rotary_seq_len_interpolation_factor": v}),
    Field("tied_embeddings", ("untie_embeddings_and_output_weights",),
          write=lambda v, cfg: {"untie_embeddings_and_output_weights": not v},
          read=lambda get: not get("untie_embeddings_and_output_weights")),
    Field("num_experts", ("num_experts",), "num_moe_experts", moe=True),
    Field("moe_ffn_hidden_size", ("moe_ffn_hidden_size",), "moe_ffn_hidden_size", moe=True,
          read=_if_moe("moe_ffn_hidden_size")),
    Field("moe_router_topk", ("moe_router_topk",), "moe_router_topk", moe=True, read=_if_moe("moe_router_topk")),
    Field("moe_router_pre_softmax", ("moe_router_pre_softmax",), "moe_router_pre_softmax", moe=True,
          read=_if_moe("moe_router_pre_softmax", bool)),
    Field("moe_aux_loss_coeff", ("moe_aux_loss_coeff",), "moe_aux_loss_coeff", moe=True, read=_moe_aux_loss_coeff,
          agrees=False),  # Megatron also takes a list, one coefficient per load-balancing type
    Field("moe_grouped_gemm", transformer="moe_grouped_gemm"),  # a run's choice: in the args, not the model file
    Field("model_type"),  # beside the flags, in the model file
    Field("transformer_impl", transformer="transformer_impl"),  # a run's choice
)
"""Every ModelConfig field, in its order (tests/models/test_config.py checks that)."""

FLAG_KEYS = {flag for field in FIELDS for flag in field.flags} | set(FIXED_FLAGS) | set(MOE_FIXED_FLAGS)
"""Every flag a model file may hold."""


def to_flags(cfg):
    """The Megatron-LM flags (YAML `model:` keys) of the architecture, as a model file stores them."""
    flags = {}
    for field in FIELDS:
        flags.update(field.to_flags(cfg))
    flags.update(FIXED_FLAGS)
    if cfg.num_experts is not None:
        flags.update(MOE_FIXED_FLAGS)
    return flags


def from_flags(cls, flags, padded_vocab_size, model_type=None, transformer_impl="local", where="model"):
    """The ModelConfig of a model file's flags (absent keys at Megatron's defaults); ValueError
    naming `where` and the key for a flag outside the architecture, a fixed flag with another
    value, a missing required flag, or a value the config refuses."""
    unknown = sorted(set(flags) - FLAG_KEYS)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: not an architecture flag this model config knows")
    for key, value in {**FIXED_FLAGS, **MOE_FIXED_FLAGS}.items():
        if key in flags and flags[key] != value:
            raise ValueError(f"{where}.{key}: only {value!r} is supported, got {flags[key]!r}")
    missing = [key for key in REQUIRED_FLAGS if key not in flags]
    if missing:
        raise ValueError(f"{where}.{missing[0]}: missing")

    def get(key):
        return flags.get(key, MEGATRON_DEFAULTS.get(key))

    beside = {"padded_vocab_size": padded_vocab_size, "model_type": model_type, "transformer_impl": transformer_impl}
    return _build(cls, get, beside, where)


def from_args(cls, args, model_type=None):
    """The ModelConfig of Megatron's validated args (what a run builds): the same rows, each flag read
    as Megatron's parser stored it; the vocabulary from the padded one when the args have none."""
    def get(key):
        value = getattr(args, ARGS_ATTRIBUTES.get(key, key))
        return not value if key == "disable_bias_linear" else value

    beside = {"padded_vocab_size": args.padded_vocab_size, "model_type": model_type,
              "transformer_impl": args.transformer_impl, "moe_grouped_gemm": bool(args.moe_grouped_gemm)}
    cfg = _build(cls, lambda key: args.padded_vocab_size if key == "vocab_size" and not args.vocab_size else get(key),
                 beside, "args")
    return cfg


def _build(cls, get, beside, where):
    values = {}
    for field in FIELDS:
        if field.name in beside:
            values[field.name] = beside[field.name]
        elif field.flags:
            values[field.name] = field.from_flags(get)
    try:
        return cls(**values)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def transformer_config_kwargs(cfg):
    """The TransformerConfig fields of the architecture (the activation follows swiglu)."""
    import torch

    kwargs = {field.transformer: getattr(cfg, field.name) for field in FIELDS if field.transformer}
    kwargs["activation_func"] = torch.nn.functional.silu if cfg.swiglu else torch.nn.functional.gelu
    if not cfg.num_experts:
        kwargs["moe_router_topk"] = 2  # Megatron's default; a dense model has no router
    return kwargs


def check_agrees(cfg, transformer_config):
    """ValueError naming the first field on which the ModelConfig and a TransformerConfig (built by
    Megatron from a run's args) describe different models."""
    for field in FIELDS:
        if field.transformer is None or not field.agrees or (field.moe and not cfg.num_experts
                                                              and field.name != "num_experts"):
            continue
        ours, theirs = getattr(cfg, field.name), getattr(transformer_config, field.transformer)
        if ours != theirs:
            raise ValueError(f"ModelConfig.{field.name} is {ours!r}, but the TransformerConfig's "
                             f"{field.transformer} is {theirs!r}")
