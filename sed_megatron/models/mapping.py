"""Name-map rows that carry both directions, and the two conversions that walk them.

A family's name map is a list of mappings such as

    QKV("decoder.layers.{layer}.self_attention.linear_qkv.weight",
        "model.layers.{layer}.self_attn.q_proj.weight", "model.layers.{layer}.self_attn.k_proj.weight",
        "model.layers.{layer}.self_attn.v_proj.weight")

Each maps the Hugging Face tensors on its right to the one Megatron tensor on its left
(`to_megatron`) and back (`to_hf`); a name with `{layer}` stands for every decoder layer.
Megatron names are those of the TP=1 GPTModel's state dict (the keys of its
sharded_state_dict), Hugging Face names those of the *ForCausalLM state dict.
"""

from dataclasses import dataclass
from typing import NamedTuple

from .transforms import fuse_gate_up, fuse_qkv, pad_vocab, split_gate_up, split_qkv, strip_vocab


@dataclass(frozen=True, init=False)
class Mapping:
    """One Megatron tensor made of one or more Hugging Face tensors."""

    megatron: str
    hf: tuple

    def __init__(self, megatron, *hf):
        object.__setattr__(self, "megatron", megatron)
        object.__setattr__(self, "hf", tuple(hf))

    def to_megatron(self, cfg, *hf_tensors):
        raise NotImplementedError

    def to_hf(self, cfg, tensor):
        """The Hugging Face tensors, in the order of self.hf."""
        raise NotImplementedError


class Direct(Mapping):
    """The same tensor on both sides (norms, projections Megatron does not fuse)."""

    def to_megatron(self, cfg, tensor):
        return tensor

    def to_hf(self, cfg, tensor):
        return (tensor,)


class QKV(Mapping):
    """Separate q, k, v projections (weights or biases) <-> Megatron's per-query-group linear_qkv."""

    def to_megatron(self, cfg, q, k, v):
        return fuse_qkv(q, k, v, cfg.num_query_groups)

    def to_hf(self, cfg, tensor):
        return split_qkv(tensor, cfg.num_query_groups, cfg.num_attention_heads, cfg.kv_channels)


class GateUp(Mapping):
    """SwiGLU's gate and up projections <-> Megatron's linear_fc1."""

    def to_megatron(self, cfg, gate, up):
        return fuse_gate_up(gate, up)

    def to_hf(self, cfg, tensor):
        return split_gate_up(tensor)


class VocabRows(Mapping):
    """An embedding or output layer: vocab_size rows <-> padded_vocab_size rows (zero padding)."""

    def to_megatron(self, cfg, tensor):
        return pad_vocab(tensor, cfg.padded_vocab_size)

    def to_hf(self, cfg, tensor):
        return (strip_vocab(tensor, cfg.vocab_size),)


class ExpertSlice(Mapping):
    """One expert's tensor <-> its slice of a Hugging Face tensor that stacks every expert on dim 0
    (transformers' in-memory MoE layout, e.g. `mlp.experts.gate_up_proj` [E, 2 ffn, h], whose
    [gate; up] rows are Megatron's linear_fc1 of that expert). Read only: export writes the
    per-expert tensors of the Hub."""

    index: int

    def __init__(self, megatron, hf, index):
        super().__init__(megatron, hf)
        object.__setattr__(self, "index", index)

    def to_megatron(self, cfg, stacked):
        return stacked[self.index]

    def to_hf(self, cfg, tensor):
        raise ValueError(f"{self.hf[0]}: stacked expert tensors are read, never written (export writes one "
                         f"tensor per expert)")


class Row(NamedTuple):
    """One mapping at one layer: concrete names."""

    megatron: str
    hf: tuple
    mapping: Mapping

    def to_megatron(self, cfg, get_hf):
        """The Megatron tensor of this row; get_hf(name) loads one Hugging Face tensor."""
        return self.mapping.to_megatron(cfg, *(get_hf(name) for name in self.hf))


def expand(mappings, num_layers):
    """Concrete rows: the mappings without `{layer}` once, then every layer's, layer by layer."""
    rows = [Row(m.megatron, m.hf, m) for m in mappings if "{layer}" not in m.megatron]
    per_layer = [m for m in mappings if "{layer}" in m.megatron]
    for layer in range(num_layers):
        for m in per_layer:
            rows.append(Row(m.megatron.format(layer=layer), tuple(n.format(layer=layer) for n in m.hf), m))
    return rows


def megatron_to_hf(get_mcore, cfg, rows, only=None):
    """Yield (Hugging Face name, tensor); get_mcore(name) loads one Megatron tensor.

    only: the Megatron names to map (default: every row)."""
    for row in rows:
        if only is not None and row.megatron not in only:
            continue
        for name, tensor in zip(row.hf, row.mapping.to_hf(cfg, get_mcore(row.megatron)), strict=True):
            yield name, tensor.contiguous()
