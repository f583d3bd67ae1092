"""Qwen3's name map: Llama's plus the query and key norms (one weight of head_dim each, shared by
every head; the same name for Transformer Engine and local layers)."""

from ..llama.mapping import HF, MC, embedding_mappings, mlp_mappings
from ..llama.mapping import attention_mappings as llama_attention_mappings
from ..mapping import Direct


def attention_mappings(cfg):
    """Llama's attention rows plus QK-norm."""
    return llama_attention_mappings(cfg) + [
        Direct(MC + "self_attention.q_layernorm.weight", HF + "self_attn.q_norm.weight"),
        Direct(MC + "self_attention.k_layernorm.weight", HF + "self_attn.k_norm.weight"),
    ]


def mappings(cfg):
    """Every mapping of a Qwen3 model."""
    return embedding_mappings(cfg) + attention_mappings(cfg) + mlp_mappings(cfg)
