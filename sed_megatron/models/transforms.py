"""Pure tensor transforms between Hugging Face and Megatron layouts, each inverse beside it.

Megatron fuses Q, K and V into one `linear_qkv` whose rows are grouped per query group:
[q heads of group 0, k of group 0, v of group 0, q heads of group 1, ...], so that a tensor
parallel split of the rows hands each rank whole groups. A plain cat([q, k, v]) is wrong as
soon as there is more than one group. SwiGLU's `linear_fc1` is cat([gate, up]). Megatron's
embedding and output layer have padded_vocab_size rows; the padding rows are zero.
"""

import torch


def fuse_qkv(q, k, v, num_groups):
    """[heads*d, ...], [groups*d, ...], [groups*d, ...] -> Megatron's per-group [(heads + 2 groups)*d, ...]."""
    rest = q.shape[1:]
    q = q.reshape(num_groups, -1, *rest)  # (groups, heads/groups*d, ...)
    k = k.reshape(num_groups, -1, *rest)  # (groups, d, ...)
    v = v.reshape(num_groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv, num_groups, num_heads, head_dim):
    """The inverse of fuse_qkv: (q, k, v)."""
    rest = qkv.shape[1:]
    per_group = qkv.reshape(num_groups, -1, *rest)  # (groups, (heads/groups + 2)*d, ...)
    q_rows = num_heads // num_groups * head_dim
    q, k, v = torch.split(per_group, [q_rows, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def fuse_gate_up(gate, up):
    """[ffn, h], [ffn, h] -> SwiGLU's [2 ffn, h]."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1):
    """The inverse of fuse_gate_up: (gate, up)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def pad_vocab(weight, padded_vocab_size):
    """Rows [V, h] -> [padded, h] with zero rows (never predicted: their logits are trained down)."""
    if weight.shape[0] == padded_vocab_size:
        return weight
    if weight.shape[0] > padded_vocab_size:
        raise ValueError(f"vocabulary of {weight.shape[0]} rows exceeds the padded size {padded_vocab_size}")
    return torch.cat([weight, weight.new_zeros(padded_vocab_size - weight.shape[0], *weight.shape[1:])])


def strip_vocab(weight, vocab_size):
    """The inverse of pad_vocab: the first vocab_size rows."""
    return weight[:vocab_size]
