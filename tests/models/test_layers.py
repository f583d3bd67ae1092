"""The local SP/CP layers alone: the CP attention against full attention (values and grads),
the token partition against Megatron's chunk order, the SP norm against TP=1."""

import pytest
import torch

from sed_megatron.models.layers import cp_partition_indices, cp_token_layout
from sed_megatron.testing.distributed import run_distributed


def test_partition_is_megatrons_load_balanced_chunk_order():
    # One sequence of 16, CP=2: 4 chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert cp_partition_indices(None, 16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_partition_indices(None, 16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # Packed: every segment is chunked on its own (TE's thd_get_partitioned_indices), here CP=2
    # over segments of 8, 4 and 4 (an empty segment is skipped).
    cu = torch.tensor([0, 8, 12, 12, 16], dtype=torch.int32)
    assert cp_partition_indices(cu, 16, 2, 0).tolist() == [0, 1, 6, 7, 8, 11, 12, 15]
    assert cp_partition_indices(cu, 16, 2, 1).tolist() == [2, 3, 4, 5, 9, 10, 13, 14]
    owner, segment = cp_token_layout(cu, 16, 2)
    assert segment.tolist() == [0] * 8 + [1] * 4 + [3] * 4
    # CP=4 over one sequence of 16: rank r holds chunks r and 7 - r of 2 positions each.
    for rank in range(4):
        expected = [2 * rank, 2 * rank + 1, 2 * (7 - rank), 2 * (7 - rank) + 1]
        assert cp_partition_indices(None, 16, 4, rank).tolist() == expected


def _reference_attention(q, k, v, segments):
    """Causal softmax attention inside each segment, float64. q [s, b, n, d], k/v [s, b, g, d]."""
    s, b, n, d = q.shape
    k = k.repeat_interleave(n // k.shape[2], dim=2)
    v = v.repeat_interleave(n // v.shape[2], dim=2)
    scores = torch.einsum("qbnd,kbnd->bnqk", q, k) / d ** 0.5
    position = torch.arange(s)
    masked = (position[None, :] > position[:, None]) | (segments[None, :] != segments[:, None])
    probs = scores.masked_fill(masked, float("-inf")).softmax(-1)
    return torch.einsum("bnqk,kbnd->qbnd", probs, v).reshape(s, b, n * d)


def _attention_module(cp_group, heads=4, groups=2, head_dim=8):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from sed_megatron.models.layers import ContextParallelAttention

    tensor_parallel.model_parallel_cuda_manual_seed(1)  # the attention dropout's RNG stream
    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=head_dim, attention_dropout=0.0,
                               use_cpu_initialization=True, masked_softmax_fusion=False,
                               context_parallel_size=cp_group.size())
    pgs = ProcessGroupCollection(tp=parallel_state.get_tensor_model_parallel_group(), cp=cp_group)
    return ContextParallelAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pgs)


def check_cp_attention_equals_full_attention():
    """CP = 1, 2 and 4 within 4 processes: each CP rank runs its chunks; outputs and input
    gradients, put back in global order, equal full attention in float64 (the differences are
    rounding, ~1e-15: 1e-12 leaves room for another summation order and nothing else)."""
    import torch.distributed as dist
    from megatron.core.packed_seq_params import PackedSeqParams

    world, rank = dist.get_world_size(), dist.get_rank()
    for cp_size in (1, 2, 4):
        groups = [dist.new_group(list(range(start, start + cp_size))) for start in range(0, world, cp_size)]
        cp_group = groups[rank // cp_size]
        attention = _attention_module(cp_group)
        _check_against_full_attention(attention, cp_size, dist.get_rank(group=cp_group), PackedSeqParams)
        if cp_size == 1:
            _check_equals_megatron_local_attention(attention)


def _check_equals_megatron_local_attention(ours):
    """At CP=1 the swap changes nothing: Megatron's DotProductAttention gives the same values."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    theirs = DotProductAttention(ours.config, 1, AttnMaskType.causal, "self", pg_collection=ours.pg_collection)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(12, 2, heads, 8, generator=gen) for heads in (4, 2, 2))  # fp32, GQA
    mask = torch.triu(torch.ones(2, 1, 12, 12, dtype=torch.bool), 1)
    torch.testing.assert_close(ours(q, k, v, mask), theirs(q, k, v, mask), rtol=0, atol=0)


def _check_against_full_attention(attention, cp_size, rank, PackedSeqParams):
    unit = 2 * cp_size  # packed segments are multiples of 2 x CP long
    s, b, n, g, d = 8 * unit, 2, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, b, heads, d, generator=gen, dtype=torch.float64) for heads in (n, g, g))
    weight = torch.randn(s, b, n * d, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 2 * unit, 6 * unit, 8 * unit], dtype=torch.int32)  # 3 packed samples
    segments = torch.repeat_interleave(torch.arange(3), cu[1:] - cu[:-1])
    cases = {
        "causal": dict(segments=torch.zeros(s, dtype=torch.long), cu=None, mask=False),
        "causal + dataloader mask": dict(segments=torch.zeros(s, dtype=torch.long), cu=None, mask=True),
        "packed thd": dict(segments=segments, cu=cu, mask=False),
    }
    for name, case in cases.items():
        name = f"CP={cp_size} {name}"
        b_case = 1 if case["cu"] is not None else b
        full = [t[:, :b_case].clone().requires_grad_() for t in (q, k, v)]
        reference = _reference_attention(*full, case["segments"])
        (reference * weight[:, :b_case]).sum().backward()

        index = cp_partition_indices(case["cu"], s, cp_size, rank)
        local = [t[:, :b_case][index].clone().requires_grad_() for t in (q, k, v)]
        mask, params = None, None
        if case["mask"]:  # the data loader's [b, 1, s, s] causal mask, sliced to this rank's query rows
            mask = torch.triu(torch.ones(b_case, 1, s, s, dtype=torch.bool), 1)[:, :, index]
        if case["cu"] is not None:  # THD: [t, heads, d], b = 1
            params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                                     cu_seqlens_kv_padded=cu, max_seqlen_q=4 * unit, max_seqlen_kv=4 * unit)
            out = attention(*(t.squeeze(1) for t in local), None, packed_seq_params=params).unsqueeze(1)
        else:
            out = attention(*local, mask)
        (out * weight[:, :b_case][index]).sum().backward()
        torch.testing.assert_close(out, reference[index].detach(), rtol=1e-12, atol=1e-12, msg=name)
        for which, mine, theirs in zip("qkv", local, full):
            # K and V gradients come back from every rank's queries through the reduce-scatter.
            torch.testing.assert_close(mine.grad, theirs.grad[index], rtol=1e-12, atol=1e-12,
                                       msg=f"{name}: d{which}")


def test_cp_attention_equals_full_attention():
    run_distributed(check_cp_attention_equals_full_attention, world_size=4)
