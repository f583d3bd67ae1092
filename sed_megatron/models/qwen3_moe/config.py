"""Qwen3-MoE architecture: a transformers Qwen3MoeConfig <-> ModelConfig.

Every decoder layer is an MoE layer (decoder_sparse_step 1, no mlp_only_layers): a router
(`mlp.gate`, [experts, hidden], no bias) scores the experts with a softmax, each token goes to
its num_experts_per_tok best, and with norm_topk_prob those k probabilities are renormalized
to sum to 1. Megatron's TopKRouter with the softmax score function computes exactly that when
moe_router_pre_softmax is off (the softmax over the k selected logits); without
norm_topk_prob the weights are the probabilities over all experts, Megatron's pre-softmax
routing. No token is dropped (Megatron's default capacity factor None). The load-balancing loss
weight router_aux_loss_coef becomes moe_aux_loss_coeff.

Variants this does not cover stop with the config field named: shared experts, MoE every n-th
layer (decoder_sparse_step != 1), dense layers among the MoE ones (mlp_only_layers), top-1
routing renormalized to weight 1 (Megatron refuses a softmax over one logit).
"""

from ..llama.config import check_expressible, llama_hf_kwargs
from ..qwen3.config import config_from_hf as qwen3_config_from_hf

# Fields by which related configs (Qwen2-MoE, DeepSeek, ...) declare shared experts.
SHARED_EXPERT_FIELDS = ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts",
                        "moe_shared_expert_intermediate_size")


def config_from_hf(config):
    """ModelConfig of a Qwen3MoeConfig; ValueError naming the field it cannot express."""
    for field in SHARED_EXPERT_FIELDS:
        if getattr(config, field, None):
            raise ValueError(f"{field}={getattr(config, field)}: shared experts are not supported (qwen3_moe has none)")
    step = getattr(config, "decoder_sparse_step", 1)
    if step != 1:
        raise ValueError(f"decoder_sparse_step={step} is not supported: every layer must be an MoE layer "
                         f"(decoder_sparse_step=1)")
    dense_layers = list(getattr(config, "mlp_only_layers", None) or [])
    if dense_layers:
        raise ValueError(f"mlp_only_layers={dense_layers} is not supported: every layer must be an MoE layer")
    experts = getattr(config, "num_experts", None)
    if not experts:
        raise ValueError(f"num_experts={experts!r}: a qwen3_moe model needs experts (a dense Qwen3 is model_type qwen3)")
    topk, renormalize = config.num_experts_per_tok, bool(config.norm_topk_prob)
    if topk == 1 and renormalize:
        raise ValueError("norm_topk_prob=true with num_experts_per_tok=1 is not supported: Megatron's top-1 routing "
                         "weighs by the softmax over all experts, never by 1")
    return qwen3_config_from_hf(config).replace(
        num_experts=experts, moe_ffn_hidden_size=config.moe_intermediate_size, moe_router_topk=topk,
        moe_router_pre_softmax=not renormalize, moe_aux_loss_coeff=float(config.router_aux_loss_coef))


def hf_config(cfg, **extra):
    """The transformers Qwen3MoeConfig of a ModelConfig (the inverse of config_from_hf)."""
    from transformers import AutoConfig

    if cfg.num_experts is None:
        raise ValueError("ModelConfig.num_experts=None: a qwen3_moe model needs experts")
    check_expressible(cfg, "qwen3_moe", qkv_bias=False, qk_layernorm=True, num_experts=cfg.num_experts)
    return AutoConfig.for_model(
        "qwen3_moe", **llama_hf_kwargs(cfg), use_sliding_window=False, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.moe_router_topk, moe_intermediate_size=cfg.moe_ffn_hidden_size,
        norm_topk_prob=not cfg.moe_router_pre_softmax, router_aux_loss_coef=cfg.moe_aux_loss_coeff,
        decoder_sparse_step=1, mlp_only_layers=[], **extra)
