"""The shared transforms: per-group QKV layout, gate/up, vocabulary padding; each with its inverse."""

import pytest
import torch

from sed_megatron.models.transforms import fuse_gate_up, fuse_qkv, pad_vocab, split_gate_up, split_qkv, strip_vocab


def test_qkv_is_grouped_not_concatenated():
    heads, groups, d = 4, 2, 3
    q = torch.arange(heads * d).float().view(-1, 1)
    k = 100 + torch.arange(groups * d).float().view(-1, 1)
    v = 200 + torch.arange(groups * d).float().view(-1, 1)
    fused = fuse_qkv(q, k, v, groups).flatten().tolist()
    # group 0: q heads 0-1, k0, v0; group 1: q heads 2-3, k1, v1
    assert fused == [0, 1, 2, 3, 4, 5, 100, 101, 102, 200, 201, 202, 6, 7, 8, 9, 10, 11, 103, 104, 105, 203, 204, 205]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(torch.tensor(fused).view(-1, 1), groups, heads, d), (q, k, v)))


@pytest.mark.parametrize("heads,groups", [(8, 8), (8, 2), (8, 1)])  # MHA, GQA, MQA
def test_qkv_round_trip_weights_and_biases(heads, groups):
    d, h = 4, 6
    gen = torch.Generator().manual_seed(0)
    for rest in ((h,), ()):  # a weight [rows, h] and a bias [rows]
        q, k, v = (torch.randn(n * d, *rest, generator=gen) for n in (heads, groups, groups))
        fused = fuse_qkv(q, k, v, groups)
        assert fused.shape == ((heads + 2 * groups) * d, *rest)
        assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, groups, heads, d), (q, k, v)))


def test_gate_up_and_vocab_padding():
    gate, up = torch.randn(5, 3), torch.randn(5, 3)
    fc1 = fuse_gate_up(gate, up)
    assert torch.equal(fc1[:5], gate) and torch.equal(fc1[5:], up)
    assert all(torch.equal(a, b) for a, b in zip(split_gate_up(fc1), (gate, up)))
    emb = torch.randn(7, 3)
    padded = pad_vocab(emb, 16)
    assert padded.shape == (16, 3) and torch.equal(padded[7:], torch.zeros(9, 3))
    assert torch.equal(strip_vocab(padded, 7), emb) and pad_vocab(emb, 7) is emb
    with pytest.raises(ValueError, match="vocabulary of 7 rows exceeds the padded size 4"):
        pad_vocab(emb, 4)
