"""The local SP/CP layers alone: the CP attention against full attention (values and grads),
the token partition against Megatron's chunk order, the SP norms against replicated ones."""

import pytest
import torch

from sed_megatron.models.layers import cp_partition_indices, cp_token_layout

from ..distributed import run_distributed


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


@pytest.mark.gpu
def test_partition_is_transformer_engines():
    """Our per-sample chunks are TE's thd_get_partitioned_indices (what TE's CP attention expects)."""
    tex = pytest.importorskip("transformer_engine_torch")
    cu = torch.tensor([0, 8, 16, 24, 40], dtype=torch.int32, device="cuda")  # multiples of 2 x CP for CP = 2, 4
    for cp_size, rank in ((2, 0), (2, 1), (4, 0), (4, 3)):
        theirs = tex.thd_get_partitioned_indices(cu, 40, cp_size, rank).long().cpu()
        assert cp_partition_indices(cu.cpu(), 40, cp_size, rank).tolist() == theirs.tolist(), (cp_size, rank)


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


def _attention_module(cp_group, tp_group, heads=4, groups=2, head_dim=8):
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from sed_megatron.models.layers import ContextParallelAttention

    tensor_parallel.model_parallel_cuda_manual_seed(1)  # the attention dropout's RNG stream
    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=head_dim, attention_dropout=0.0,
                               use_cpu_initialization=True, masked_softmax_fusion=False,
                               context_parallel_size=cp_group.size())
    pgs = ProcessGroupCollection(tp=tp_group, cp=cp_group)
    return ContextParallelAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pgs)


def check_local_parallel_layers():
    """2 processes (Megatron's TP = 2): the CP attention at CP = 1 and 2 against full attention
    (with groups of its own, TP = 1), then the SP norms in a GPT model at TP = 2. (CP = 4 only
    changes the chunk order, checked without processes above.)"""
    import torch.distributed as dist
    from megatron.core.packed_seq_params import PackedSeqParams

    world, rank = dist.get_world_size(), dist.get_rank()
    singles = [dist.new_group([r]) for r in range(world)]
    for cp_size in (1, 2):
        groups = [dist.new_group(list(range(start, start + cp_size))) for start in range(0, world, cp_size)]
        cp_group = groups[rank // cp_size]
        attention = _attention_module(cp_group, singles[rank])
        # Each CP rank runs its chunks; outputs and input gradients, put back in global order,
        # equal full attention in float64: the differences are rounding (~1e-15), so 1e-12
        # leaves room for another summation order and nothing else.
        _check_against_full_attention(attention, cp_size, dist.get_rank(group=cp_group), PackedSeqParams)
        if cp_size == 1:
            _check_equals_megatron_local_attention(attention)
    _check_sequence_parallel_norms()


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


def _check_sequence_parallel_norms():
    """A GPT model with Q/K norms (Qwen3's qk_layernorm) at TP=2 with and without SP, same weights:
    the same logits and, once the SP-marked norm gradients are summed over TP (what
    finalize_model_grads does; Q/K norms always, by name), the same gradients. fp32, scattered vs
    replicated norms: rounding only (~1e-7)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from sed_megatron.models import build_gpt_model
    from sed_megatron.testing.models import tiny_model_config

    tp_group = parallel_state.get_tensor_model_parallel_group()
    model_cfg = tiny_model_config(vocab_size=96, max_sequence_length=16).replace(qk_layernorm=True)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 96, (2, 16), generator=gen)
    weight = torch.randn(2, 16, 48, generator=gen)  # this rank's half of the vocabulary
    causal = torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), 1)
    results = {}
    for sp in (False, True):
        torch.manual_seed(5)
        tensor_parallel.model_parallel_cuda_manual_seed(5)
        model = build_gpt_model(model_cfg, model_cfg.transformer_config(tensor_model_parallel_size=2,
                                                                        sequence_parallel=sp))
        norms = {name: p for name, p in model.named_parameters() if "norm" in name}
        assert len(norms) == 2 * 4 + 1  # per layer: input, pre-MLP, Q and K norms; the final norm
        assert all(getattr(p, "sequence_parallel", False) == sp for p in norms.values())
        logits = model(tokens, torch.arange(16).expand(2, -1), causal)  # [b, s, V/tp]
        _engine_backward((logits * weight).sum())
        grads = {}
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            if getattr(p, "sequence_parallel", False) or "q_layernorm" in name or "k_layernorm" in name:
                dist.all_reduce(grad, group=tp_group)
            grads[name] = grad
        results[sp] = logits.detach(), grads
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _engine_backward(loss):
    """The backward pass as Megatron's schedules start it (the autograd engine directly): a
    `loss.backward()` call is a torch function, during which the CPU layer's device mode is off,
    and SP's column-parallel backward allocates on "cuda"."""
    from torch.autograd import Variable

    Variable._execution_engine.run_backward(tensors=(loss,), grad_tensors=(torch.ones_like(loss),), keep_graph=False,
                                            create_graph=False, inputs=(), allow_unreachable=True,
                                            accumulate_grad=True)


def test_local_parallel_layers():
    run_distributed(check_local_parallel_layers, world_size=2, tp=2)
