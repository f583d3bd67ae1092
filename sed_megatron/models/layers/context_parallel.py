"""Context parallelism on the local layers: all-gather K and V, attend with the local queries.

Megatron splits every sequence into 2 x CP equal chunks and gives CP rank r the chunks r and
2 x CP - 1 - r (load balancing: early chunks see few keys under the causal mask, late ones
many). Packed THD rows are split the same way per sample (per segment of cu_seqlens, each a
multiple of 2 x CP long), the order of Transformer Engine's `thd_get_partitioned_indices`.
In both cases a rank's tokens are the global positions it owns, in ascending order.

`ContextParallelAttention` is the scheme Llama 3's training used: every rank all-gathers the
K and V of its CP group (the backward reduce-scatters their gradients), builds the causal
mask of its queries from global positions (and from sample boundaries in packed rows), and
computes attention for its own queries only. Memory: K and V of the whole sequence plus
[b, heads/tp, s/cp, s] scores per layer; TE's ring attention is the path for long sequences
on GPUs, this one is for CPUs and for GPUs without Transformer Engine.

    [sq, b, heads, head_dim] local queries, keys, values -> [sq, b, heads * head_dim]
    THD (packed_seq_params.qkv_format == "thd"): [t, heads, head_dim] -> [t, heads * head_dim]
"""

import math

import torch

from sed_megatron.parallel import all_gather_sequence, group_rank_and_size


def cp_token_layout(cu_seqlens, total, cp_size, device=None):
    """(owner, segment): for each of `total` global token positions, the CP rank that holds it
    and the index of its segment (sample) in cu_seqlens.

    cu_seqlens: int [n + 1] segment boundaries ending at `total`, every segment a multiple of
    2 x cp_size long; None: one segment (an unpacked row). Collective-free, no host sync."""
    device = device if device is not None else (cu_seqlens.device if cu_seqlens is not None else None)
    position = torch.arange(total, device=device)
    if cu_seqlens is None:
        segment = torch.zeros_like(position)
        start = torch.zeros_like(position)
        length = torch.full_like(position, total)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int64).reshape(-1)
        segment = torch.searchsorted(cu[1:], position, right=True)  # ends <= position: empty segments skipped
        start, length = cu[segment], cu[segment + 1] - cu[segment]
    chunk = (position - start) // (length // (2 * cp_size))  # 0 .. 2 * cp_size - 1 within the segment
    owner = torch.where(chunk < cp_size, chunk, 2 * cp_size - 1 - chunk)
    return owner, segment


def cp_partition_indices(cu_seqlens, total, cp_size, cp_rank, device=None):
    """Global positions held by `cp_rank` (ascending): for every segment its chunks cp_rank and
    2 x cp_size - 1 - cp_rank (TE's thd_get_partitioned_indices; Megatron's per-sequence split
    when cu_seqlens is None)."""
    owner, _ = cp_token_layout(cu_seqlens, total, cp_size, device)
    return torch.nonzero(owner == cp_rank).reshape(-1)


def check_cp_segments(cu_seqlens, cp_size):
    """ValueError unless every segment of cu_seqlens is a multiple of 2 x cp_size long (host sync)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bad = [n for n in lengths if n % (2 * cp_size)]
    if bad:
        raise ValueError(f"packed samples of {bad[0]} positions do not split into 2 x CP = {2 * cp_size} chunks: "
                         f"pack them with segments padded to a multiple of {2 * cp_size}")


def _cp_attention_module_base():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class ContextParallelAttention(_cp_attention_module_base()):
    """Core attention of the local layers at any CP size (CP=1: plain masked softmax attention).

    Same constructor and forward as Megatron's DotProductAttention (a SelfAttention's
    `core_attention`). cp_comm_type is accepted and ignored: K and V are always all-gathered."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.utils import attention_mask_func
        from megatron.core.utils import divide

        super().__init__(config=config)
        for name, unsupported in (("window_size", config.window_size is not None),
                                  ("softmax_type", config.softmax_type != "vanilla"),
                                  ("multi_latent_attention", config.multi_latent_attention)):
            if unsupported:
                raise ValueError(f"TransformerConfig.{name}: not supported by the local context-parallel attention")
        if pg_collection is None or getattr(pg_collection, "cp", None) is None:
            # Megatron's SelfAttention always passes the model's groups; no global lookup here.
            raise ValueError("ContextParallelAttention needs the model's ProcessGroupCollection (tp and cp)")
        self.pg_collection = pg_collection
        self.cp_group = pg_collection.cp
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.num_heads = divide(config.num_attention_heads, tp_size)  # per TP rank
        self.num_groups = divide(config.num_query_groups, tp_size)
        head_dim = divide(config.kv_channels * config.num_attention_heads, config.num_attention_heads)
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        coeff = None
        if config.apply_query_key_layer_scaling:
            coeff = self.layer_number
            self.softmax_scale /= coeff
        # An explicit mask every time (the queries are not the keys' first positions), so the
        # softmax is told "padding": a fused kernel must not assume an upper-triangular mask.
        self.scale_mask_softmax = FusedScaleMaskSoftmax(
            input_in_fp16=config.fp16, input_in_bf16=config.bf16, attn_mask_type=AttnMaskType.padding,
            scaled_masked_softmax_fusion=config.masked_softmax_fusion, mask_func=attention_mask_func,
            softmax_in_fp32=config.attention_softmax_in_fp32, scale=coeff)
        self.attention_dropout = torch.nn.Dropout(config.attention_dropout if attention_dropout is None
                                                  else attention_dropout)

    def causal_mask(self, sq, packed_seq_params, device):
        """(query positions [sq], key positions [cp * sq] in all-gather order, bool [sq, cp * sq]
        mask, True = masked): a query sees the keys of its own segment at or before it."""
        cp_rank, cp_size = group_rank_and_size(self.cp_group)
        cu = None
        if packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        owner, segment = cp_token_layout(cu, sq * cp_size, cp_size, device)
        keys = torch.argsort(owner, stable=True)  # rank 0's positions, then rank 1's, ...: the gather order
        queries = keys[cp_rank * sq:(cp_rank + 1) * sq]
        masked = (segment[keys][None, :] != segment[queries][:, None]) | (keys[None, :] > queries[:, None])
        return queries, keys, masked

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from megatron.core import tensor_parallel

        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the local context-parallel attention")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            if attention_mask is not None:
                raise ValueError("packed (THD) rows carry their boundaries in cu_seqlens, not an attention mask")
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))  # [t, 1, n, d]
        sq, b, heads, head_dim = query.shape
        key = all_gather_sequence(key, self.cp_group)  # [cp * sq, b, groups, d], in rank order
        value = all_gather_sequence(value, self.cp_group)
        sk = key.shape[0]
        _, key_positions, masked = self.causal_mask(sq, packed_seq_params if thd else None, query.device)
        masked = masked.view(1, 1, sq, sk)
        if attention_mask is not None:  # [b|1, 1, sq, s]: this rank's query rows, keys in global order
            if attention_mask.shape[-1] != sk or attention_mask.shape[-2] != sq:
                raise ValueError(f"attention mask {tuple(attention_mask.shape)} does not match {sq} local queries "
                                 f"and {sk} keys of the whole sequence")
            masked = masked | attention_mask.index_select(-1, key_positions)

        if heads > key.shape[2]:  # grouped-query attention: each K/V head serves heads / groups queries
            repeat = heads // key.shape[2]
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        q = query.reshape(sq, b * heads, head_dim).transpose(0, 1)  # [b*n, sq, d]
        k = key.reshape(sk, b * heads, head_dim).permute(1, 2, 0)  # [b*n, d, sk]
        scores = torch.baddbmm(q.new_empty((b * heads, sq, sk)), q, k, beta=0.0, alpha=self.softmax_scale)
        probs = self.scale_mask_softmax(scores.view(b, heads, sq, sk), masked, None)
        if not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.attention_dropout(probs)
        else:
            probs = self.attention_dropout(probs)
        v = value.reshape(sk, b * heads, value.shape[-1]).transpose(0, 1)  # [b*n, sk, d]
        context = torch.bmm(probs.view(b * heads, sq, sk), v)  # [b*n, sq, d]
        context = context.view(b, heads, sq, -1).permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, n*d]
        return context.view(sq, -1) if thd else context
