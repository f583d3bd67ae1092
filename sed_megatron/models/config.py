"""ModelConfig: the architecture of a decoder-only GPT model, typed, and its Megatron-LM flags.

    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                      num_query_groups=2, kv_channels=16, vocab_size=120, padded_vocab_size=1024)
    flags = cfg.to_megatron_flags()                       # what sed_megatron_model.yaml stores
    ModelConfig.from_megatron_flags(flags, padded_vocab_size=1024) == cfg

The flags are Megatron-LM's own (YAML `model:` keys), so a converted checkpoint's model file
feeds Megatron's parser unchanged. Fields a flag cannot carry (the padded vocabulary, the
Hugging Face model_type, the layer implementation) travel beside it.
"""

import dataclasses
from dataclasses import dataclass

VOCAB_MULTIPLE = 1024
"""Converted embeddings are padded to a multiple of this many rows: they split at any TP dividing it."""

# Megatron implements Llama-3 RoPE scaling with these constants; only the factor is a flag.
LLAMA3_ROPE_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")
TRANSFORMER_IMPLS = ("local", "transformer_engine")


def padded_vocab_size(vocab_size, multiple=VOCAB_MULTIPLE):
    """vocab_size rounded up to a multiple of `multiple`."""
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class ModelConfig:
    """What a checkpoint's weights mean: shapes, normalization, attention and position encoding."""

    num_layers: int
    """Decoder layers."""
    hidden_size: int
    """Width of the residual stream."""
    ffn_hidden_size: int
    """Width of the dense MLP (each of SwiGLU's gate and up projections)."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (grouped-query attention); num_attention_heads for multi-head attention."""
    kv_channels: int
    """Width of one attention head (head_dim); need not be hidden_size / num_attention_heads."""
    vocab_size: int
    """Token ids the model knows (rows of the Hugging Face embedding)."""
    padded_vocab_size: int
    """Rows of Megatron's embedding and output layer (>= vocab_size); the extra rows are never predicted."""
    max_position_embeddings: int = 4096
    """Longest sequence the position encoding is defined for."""
    normalization: str = "RMSNorm"
    """Layer norm kind: RMSNorm or LayerNorm."""
    norm_epsilon: float = 1e-5
    """Epsilon of every layer norm."""
    swiglu: bool = True
    """Gated SiLU MLP (linear_fc1 = [gate; up]); False: a plain GELU MLP."""
    add_bias_linear: bool = False
    """Biases in the linear layers (all of them; QKV biases alone are qkv_bias)."""
    qkv_bias: bool = False
    """Biases in the fused QKV projection (Qwen2)."""
    qk_layernorm: bool = False
    """A layer norm on each query and key head before RoPE (Qwen3)."""
    position_embedding_type: str = "rope"
    """rope, learned_absolute or none."""
    rotary_base: int = 10000
    """RoPE theta (an integer: Megatron's --rotary-base)."""
    rotary_percent: float = 1.0
    """Share of each head's dimensions that RoPE rotates."""
    rope_scaling_factor: float | None = None
    """Llama-3 RoPE scaling with this factor (and LLAMA3_ROPE_CONSTANTS); None: no scaling."""
    rotary_seq_len_interpolation_factor: float | None = None
    """Linear position interpolation factor of RoPE; None: none."""
    tied_embeddings: bool = True
    """The output layer shares the input embedding's weights."""
    num_experts: int | None = None
    """Routed experts per MoE layer; None: every MLP is dense."""
    moe_ffn_hidden_size: int | None = None
    """Width of one expert's MLP (MoE only)."""
    moe_router_topk: int = 2
    """Experts each token is routed to (MoE only)."""
    moe_router_pre_softmax: bool = False
    """Routing weights are the softmax over all experts at the top k (MoE only); False: the softmax
    over the top k logits alone, i.e. those probabilities renormalized to sum to 1 (Qwen3's
    norm_topk_prob=true)."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the router's load-balancing loss in the objective (MoE only; Qwen3's router_aux_loss_coef)."""
    moe_grouped_gemm: bool = False
    """Experts as one grouped GEMM (Transformer Engine's TEGroupedMLP, parameters `weight{i}`); False:
    one MLP per expert (SequentialMLP, `local_experts.{i}`). Both store the same checkpoint keys."""
    model_type: str | None = None
    """The Hugging Face model_type whose family builds, names and converts it; None: a model
    defined by Megatron flags alone (the standard GPT layers)."""
    transformer_impl: str = "local"
    """Layer implementation: local (Megatron-Core's own modules) or transformer_engine."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "vocab_size", "padded_vocab_size", "max_position_embeddings", "rotary_base"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name}: expected a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"ModelConfig.num_query_groups: {self.num_query_groups} does not divide "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"ModelConfig.padded_vocab_size: {self.padded_vocab_size} is smaller than "
                             f"vocab_size {self.vocab_size}")
        for name, allowed in (("normalization", NORMALIZATIONS), ("position_embedding_type", POSITION_EMBEDDINGS),
                              ("transformer_impl", TRANSFORMER_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not self.norm_epsilon > 0:
            raise ValueError(f"ModelConfig.norm_epsilon: expected > 0, got {self.norm_epsilon!r}")
        if not 0 < self.rotary_percent <= 1:
            raise ValueError(f"ModelConfig.rotary_percent: expected in (0, 1], got {self.rotary_percent!r}")
        if self.rope_scaling_factor is not None and not self.rope_scaling_factor > 0:
            raise ValueError(f"ModelConfig.rope_scaling_factor: expected > 0 or None, got {self.rope_scaling_factor!r}")
        if self.num_experts is not None:
            if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
                raise ValueError(f"ModelConfig.num_experts: expected a positive integer or None, got {self.num_experts!r}")
            if not 1 <= self.moe_router_topk <= self.num_experts:
                raise ValueError(f"ModelConfig.moe_router_topk: {self.moe_router_topk} is not in [1, num_experts "
                                 f"{self.num_experts}]")
            if self.moe_router_topk == 1 and not self.moe_router_pre_softmax:
                # A softmax over one logit is 1 with zero gradient: Megatron refuses it.
                raise ValueError("ModelConfig.moe_router_pre_softmax: top-1 routing needs the softmax over all experts")
        if not self.moe_aux_loss_coeff >= 0:
            raise ValueError(f"ModelConfig.moe_aux_loss_coeff: expected >= 0, got {self.moe_aux_loss_coeff!r}")
        if self.moe_grouped_gemm and self.transformer_impl != "transformer_engine":
            raise ValueError("ModelConfig.moe_grouped_gemm: grouped GEMM experts need transformer_impl "
                             "transformer_engine (the local layers build one MLP per expert)")

    @property
    def heads_per_group(self):
        return self.num_attention_heads // self.num_query_groups

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ Megatron (megatron_fields.py's table)

    def to_megatron_flags(self):
        """Megatron-LM flags (YAML `model:` keys) that describe the architecture, as a model file
        stores them. Dropout is off: these models are fine-tuned as they were pre-trained (Megatron's
        default is 0.1). The padded vocabulary, model_type and layer implementation are not flags."""
        from . import megatron_fields

        return megatron_fields.to_flags(self)

    @classmethod
    def from_megatron_flags(cls, flags, padded_vocab_size, model_type=None, transformer_impl="local", where="model"):
        """The inverse of to_megatron_flags; `where` names the source in errors (a file, a section).

        Reads every model file the converters have written. A flag outside the architecture, or a
        value this config cannot express, is an error naming it."""
        from . import megatron_fields

        return megatron_fields.from_flags(cls, dict(flags), padded_vocab_size, model_type, transformer_impl, where)

    @classmethod
    def from_megatron_args(cls, args, model_type=None):
        """The ModelConfig of Megatron-LM's validated args: what a run builds (`model_type` from the
        converted checkpoint's model file; None: a model defined by flags alone)."""
        from . import megatron_fields

        return megatron_fields.from_args(cls, args, model_type)

    def transformer_config(self, **overrides):
        """A Megatron-Core TransformerConfig of this architecture (TP=1, fp32, CPU initialization,
        no fusions) for tests and tools that build a model without Megatron-LM's parser;
        `overrides` sets any other TransformerConfig field (parallel sizes, dtypes)."""
        from megatron.core.transformer import TransformerConfig

        from . import megatron_fields

        kwargs = dict(
            megatron_fields.transformer_config_kwargs(self), hidden_dropout=0.0, attention_dropout=0.0,
            use_cpu_initialization=True, gradient_accumulation_fusion=False, persist_layer_norm=False,
            bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
            bias_activation_fusion=False,
        )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)
