"""Qwen3-MoE's name map: Qwen3's embeddings and attention, then the MoE layer: the router, the
norm before it, and each expert's SwiGLU.

Hugging Face names every expert's tensors on the Hub and in what save_pretrained writes
(`mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`); transformers itself holds them
stacked (`mlp.experts.gate_up_proj` [E, 2 ffn, h] = [gate; up] per expert, `mlp.experts.down_proj`
[E, h, ffn]), which is also what save_pretrained(save_original_format=False) writes. Both are
read; export writes the Hub's. Megatron names each expert's fc1/fc2 by its layer
implementation: one MLP per expert (SequentialMLP, local or TE linears:
`mlp.experts.local_experts.{e}.linear_fc1.weight`) or one grouped GEMM (TEGroupedMLP:
`mlp.experts.linear_fc1.weight{e}`); both store the same checkpoint keys. The MoE layer's
norm is its own module (`pre_mlp_layernorm`) with either implementation.
"""

from ..llama.mapping import HF, MC, embedding_mappings
from ..mapping import Direct, ExpertSlice, GateUp
from ..qwen3.mapping import attention_mappings

STACKED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def expert_names(cfg, expert):
    """(fc1, fc2) Megatron names of one expert (global index: the TP=1, EP=1 model)."""
    if cfg.moe_grouped_gemm:
        return MC + f"mlp.experts.linear_fc1.weight{expert}", MC + f"mlp.experts.linear_fc2.weight{expert}"
    prefix = MC + f"mlp.experts.local_experts.{expert}."
    return prefix + "linear_fc1.weight", prefix + "linear_fc2.weight"


def moe_mappings(cfg, stacked=False):
    """Router, the norm before the MoE layer, every expert (per-expert tensors, or slices of stacked ones)."""
    rows = [Direct(MC + "mlp.router.weight", HF + "mlp.gate.weight"),
            Direct(MC + "pre_mlp_layernorm.weight", HF + "post_attention_layernorm.weight")]
    for expert in range(cfg.num_experts):
        fc1, fc2 = expert_names(cfg, expert)
        if stacked:
            rows += [ExpertSlice(fc1, HF + STACKED[0], expert), ExpertSlice(fc2, HF + STACKED[1], expert)]
        else:
            hf = HF + f"mlp.experts.{expert}."
            rows += [GateUp(fc1, hf + "gate_proj.weight", hf + "up_proj.weight"), Direct(fc2, hf + "down_proj.weight")]
    return rows


def mappings(cfg):
    """Every mapping of a Qwen3-MoE model, with the Hub's per-expert tensors (what export writes)."""
    return embedding_mappings(cfg) + attention_mappings(cfg) + moe_mappings(cfg)


def stored_mappings(cfg, names):
    """The name map of tensors stored stacked (transformers' in-memory layout); None: per expert."""
    if not any(name.endswith(STACKED) for name in names):
        return None
    return embedding_mappings(cfg) + attention_mappings(cfg) + moe_mappings(cfg, stacked=True)
