"""The vocab-parallel SFT token loss: one autograd Function that owns the collectives.

The loss is per token, so every leading dim of the logits is a token dim: Megatron's
`[s, b, V/tp]` and the `[b, s, V/tp]` that GPTModel returns without labels are both accepted
(and any `[..., V/tp]`); sft_token_loss flattens them to `[t, V/tp]` (a view when contiguous)
and chunks every pass that needs temporaries along tokens, never along a leading dim that may
be 1. What differs between the loss kinds is a strategy from `kinds/` (looked up by
LossConfig.kind): the Function runs the same steps for every kind.

Collectives per call over `tp_group` (none when it is None or has one rank):
  1. all-gather of each rank's top-k logits and its part of the target logit: `[t, k + 1]`
     fp32 per rank; the global top-k, the global max and z_y (the one nonzero part) follow.
  2. all-reduce (sum) of the packed per-token partial sums: `[n, t]` fp32, n = 1 (sum of exp)
     + 1 with the entropy + the kind's extra sums (GEM: 2, or 3 with h = logsigmoid).
Megatron's vocab_parallel_cross_entropy does three all-reduces of `[t]`.

The steps of one block of tokens are `shard_loss_forward` (both collectives), built from
functions that the fused output-layer loss (`fused_linear.py`) also runs, once per chunk of
tokens, so both paths share one implementation of every step.

Memory: one fp32 `[t, V/tp]` buffer, as in Megatron's CE. It holds exp(z - m) from forward
to backward and becomes the gradient in place. With fp32 contiguous logits and inplace=True
the buffer is the caller's logits tensor (Megatron's convention: the logits are overwritten),
otherwise a copy. Passes with extra sums (GEM, the entropy) add temporaries of one chunk of
tokens (`chunks.CHUNK_ELEMENTS` elements), whatever the shard's size.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

from ..parallel import group_rank_and_size
from . import math as loss_math
from .config import IGNORE_INDEX, LossConfig
from .kinds import KindLoss, TokenSums, get_kind


def real_columns(vocab_size, vocab_start, shard_size):
    """How many of this shard's ids are real tokens: ids >= vocab_size are padding rows of the
    embedding (added for TP divisibility), with no probability and no gradient."""
    return max(0, min(shard_size, vocab_size - vocab_start))


def _all_gather_candidates(candidates, target_part, tp_group, world_size):
    """Each rank's candidates `[t, k']` and target-logit part `[t]` -> all candidates `[t, tp * k']`, z_y `[t]`.

    Only the rank that holds the target contributes a nonzero part, so the sum is exact.
    """
    num_tokens, count = candidates.shape
    packed = torch.cat([candidates, target_part.unsqueeze(-1)], dim=-1)  # [t, k' + 1]
    gathered = [torch.empty_like(packed) for _ in range(world_size)]
    dist.all_gather(gathered, packed, group=tp_group)
    gathered = torch.stack(gathered, dim=1)  # [t, tp, k' + 1], rank order
    return gathered[..., :count].reshape(num_tokens, world_size * count), gathered[..., count].sum(dim=-1)


def global_topk_and_target(candidates, target_logit, target, cfg: LossConfig, tp_group, world_size):
    """Collective 1: this rank's top-k candidates `[t, k']` and target-logit part `[t]` (fp32)
    -> the global top-k logits `[t, k]`, the global max m `[t]` and x_y = z_y - m `[t]`."""
    if world_size > 1:
        candidates, target_logit = _all_gather_candidates(candidates, target_logit, tp_group, world_size)
    topk_logits = loss_math.global_topk(candidates, cfg.top_k)  # [t, k]
    logits_max = topk_logits.amax(dim=-1)  # [t]
    return topk_logits, logits_max, loss_math.shifted_target_logit(target, target_logit, logits_max)


def all_reduce_sums_(partial, tp_group, world_size):
    """Collective 2: the packed per-token partial sums `[n, t]`, summed over the group in place."""
    if world_size > 1:
        dist.all_reduce(partial, group=tp_group)
    return partial


class ShardLoss(NamedTuple):
    """One block of tokens on this rank's shard after the forward: what the gradient needs, and the results."""

    buffer: torch.Tensor
    """`[t, V/tp]` fp32 exp(z - m) (0 at padding ids); the gradient form works in it in place."""
    index: torch.Tensor
    """`[t]` int64 the target's column in this shard (0 where absent)."""
    in_shard: torch.Tensor
    """`[t]` bool whether the target lies in this shard."""
    logits_max: torch.Tensor
    """`[t]` fp32 the global max m (the recompute of exp(z - m) needs it)."""
    sums: TokenSums
    kind_loss: KindLoss
    stat_values: tuple
    """The stats `[t]`, in the order of `math.stat_names`."""


def token_results(target, target_shifted, partial, topk_logits, logits_max, kind, cfg, with_entropy):
    """From the globally reduced sums `[n, t]`: (TokenSums, the kind's KindLoss, the stats in stat_names order)."""
    sum_exp, sum_exp_x, extra = loss_math.split_sums(partial, with_entropy)
    sums = TokenSums(sum_exp, target_shifted, extra)
    terms = loss_math.token_terms(target, sums, topk_logits - logits_max.unsqueeze(-1))
    kind_loss = kind.token_loss(cfg, terms)
    stats = loss_math.token_stats(terms, kind_loss, sum_exp_x)
    return sums, kind_loss, tuple(stats[name] for name in loss_math.stat_names(kind, with_entropy))


def working_buffer(logits, inplace):
    """The fp32 `[t, V/tp]` buffer the loss works in: the caller's fp32 logits with inplace, else a
    copy (a mixed bf16 - fp32 subtraction would materialize a promoted copy on CPU: convert first)."""
    return logits.to(torch.float32, copy=not inplace)


def shard_loss_forward(logits, target, cfg: LossConfig, tp_group, inplace, with_entropy, vocab_size) -> ShardLoss:
    """The loss of tokens `[t]` from this rank's logits `[t, V/tp]`: both collectives, every kind.

    sft_token_loss runs it once on all tokens; the fused output-layer loss once per chunk for the
    kinds whose sums need the global max first.
    """
    kind = get_kind(cfg.kind)
    rank, world_size = group_rank_and_size(tp_group)
    shard_size = logits.size(-1)
    vocab_start = rank * shard_size
    real = real_columns(vocab_size, vocab_start, shard_size)
    index, in_shard = loss_math.shard_target_index(target, vocab_start, vocab_start + shard_size)

    # The one fp32 [t, V/tp] buffer: z, then x = z - m, then exp(x) (or the kind's kept form) in
    # place, kept for backward. Top-k candidates and z_y are read from it (exact: bf16 values are
    # fp32 values).
    buffer = working_buffer(logits, inplace)
    candidates = loss_math.local_topk_candidates(buffer[:, :real], cfg.top_k, shard_size)  # [t, k']
    target_logit = loss_math.local_target_logit(buffer, index, in_shard)  # [t]
    topk_logits, logits_max, target_shifted = global_topk_and_target(candidates, target_logit, target, cfg,
                                                                      tp_group, world_size)
    partial = loss_math.exp_and_partial_sums_(buffer, logits_max, real, target_shifted, kind, cfg,
                                              with_entropy)  # [n, t]
    all_reduce_sums_(partial, tp_group, world_size)
    sums, kind_loss, stat_values = token_results(target, target_shifted, partial, topk_logits, logits_max, kind, cfg,
                                                 with_entropy)
    return ShardLoss(buffer, index, in_shard, logits_max, sums, kind_loss, stat_values)


def local_shard_stats(logits, index, in_shard, real, kind, cfg, with_entropy) -> loss_math.LocalStats:
    """A softmax-form kind's LocalStats of tokens `[c]` from this rank's logits `[c, V/tp]`, no collective.

    The PyTorch twin of `triton_kernels.local_shard_stats`: the sums are taken relative to the
    shard's own max and made global afterwards (`loss_from_local_stats`), so a caller may take
    them for many chunks of tokens and reduce once. fp32 logits are consumed (they become the
    kept buffer), 16-bit ones are copied.
    """
    buffer = working_buffer(logits, inplace=True)
    candidates = loss_math.local_topk_candidates(buffer[:, :real], cfg.top_k, logits.size(-1))  # [c, k']
    target_logit = loss_math.local_target_logit(buffer, index, in_shard)  # [c]
    local_max = candidates.amax(dim=-1)  # -inf on a shard without real ids
    shift_by = torch.where(torch.isfinite(local_max), local_max, 0.0)
    sums = loss_math.exp_and_partial_sums_(buffer, shift_by, real, None, kind, cfg, with_entropy)
    tempered = (sums[-2], sums[-1]) if kind.temperature(cfg) != 1.0 else None
    return loss_math.LocalStats(local_max, sums[0], sums[1] if with_entropy else None, tempered, candidates,
                                target_logit)


def loss_from_local_stats(stats: loss_math.LocalStats, target, kind, cfg, tp_group, world_size, with_entropy):
    """Both collectives on the LocalStats of tokens `[t]` -> (logits_max, TokenSums, KindLoss, stats `[t]`)."""
    topk_logits, logits_max, target_shifted = global_topk_and_target(stats.candidates, stats.target_logit, target,
                                                                      cfg, tp_group, world_size)
    partial = loss_math.rescale_partial_sums(stats.local_max, logits_max, stats.sum_exp, stats.sum_exp_x,
                                             stats.tempered, kind.temperature(cfg))
    all_reduce_sums_(partial, tp_group, world_size)
    sums, kind_loss, stat_values = token_results(target, target_shifted, partial, topk_logits, logits_max, kind, cfg,
                                                 with_entropy)
    return logits_max, sums, kind_loss, stat_values


class _VocabParallelSFTLoss(torch.autograd.Function):
    """logits `[t, V/tp]`, target `[t]` -> loss `[t]` and the stats `[t]` (t tokens, flattened by the caller)."""

    @staticmethod
    def forward(ctx, logits, target, cfg: LossConfig, tp_group, inplace, with_entropy, vocab_size):
        result = shard_loss_forward(logits, target, cfg, tp_group, inplace, with_entropy, vocab_size)
        ctx.kind, ctx.cfg = get_kind(cfg.kind), cfg
        ctx.input_dtype = logits.dtype
        ctx.save_for_backward(result.buffer, result.index, result.in_shard, result.kind_loss.grad_scale, *result.sums)
        ctx.mark_non_differentiable(*result.stat_values)
        return (result.kind_loss.loss, *result.stat_values)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        buffer, index, in_shard, grad_scale, *sums = ctx.saved_tensors
        coef = grad_loss.float() * grad_scale  # [t]
        grad = ctx.kind.gradient_(ctx.cfg, buffer, TokenSums(*sums), coef, index, in_shard)
        return grad.to(ctx.input_dtype), None, None, None, None, None, None


def _validate_inputs(logits, target, cfg):
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"sft_token_loss: cfg must be a LossConfig, got {type(cfg).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"sft_token_loss: logits must be a float tensor, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(
            f"sft_token_loss: logits must be [s, b, V/tp] or [b, s, V/tp] (any leading token dims, "
            f"at least one, then the vocab shard), got shape {tuple(logits.shape)}"
        )
    if target.dtype != torch.int64:
        raise TypeError(f"sft_token_loss: target must be int64 token ids, got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"sft_token_loss: target shape {tuple(target.shape)} does not match logits "
            f"{tuple(logits.shape)} (expected the logits' token dims {tuple(logits.shape[:-1])})"
        )


def validate_target_ids(target, cfg, vocab_size, caller="sft_token_loss"):
    """top_k fits the vocabulary, and every target is a real id or IGNORE_INDEX (one device sync)."""
    if cfg.top_k > vocab_size:
        raise ValueError(f"LossConfig.top_k: {cfg.top_k} exceeds the vocabulary size {vocab_size}")
    bad = ((target < 0) & (target != IGNORE_INDEX)) | (target >= vocab_size)
    if bool(bad.any()):  # one device sync per call; a wrong id would otherwise give a silent zero
        bad_id = int(target[bad][0])
        raise ValueError(
            f"{caller}: target id {bad_id} is outside the vocabulary [0, {vocab_size}) "
            f"(and not the ignore index {IGNORE_INDEX})"
        )


def sft_token_loss(logits, target, cfg: LossConfig, tp_group=None, *, inplace=False, with_entropy=False,
                   vocab_size=None):
    """Per-token SFT loss of one vocab shard, exact under tensor parallelism.

    Layouts: the loss is per token and treats every leading dim as a token dim, so
    `[s, b, V/tp]` (Megatron's) and `[b, s, V/tp]` (GPTModel's logits without labels, what
    the trainer passes) give the same per-token values; loss and stats come back in the
    logits' leading shape. Passes with temporaries (GEM, the entropy) are chunked along tokens.

    Args:
        logits: `[s, b, V/tp]` or `[b, s, V/tp]` (generally `[..., V/tp]`) float (any dtype),
            this rank's contiguous vocab shard (rank r holds ids [r V/tp, (r+1) V/tp)); may be
            an autograd non-leaf. Non-contiguous logits are copied once (inplace then has no effect).
        target: the logits' leading shape (`[s, b]` or `[b, s]`), int64 global token ids;
            IGNORE_INDEX (-100) gives loss 0 and no gradient.
        cfg: the LossConfig.
        tp_group: the tensor-parallel process group; None means a single process (no collectives).
        inplace: with fp32 logits, reuse the logits' storage as the working buffer (saves one
            `[..., V/tp]` fp32 tensor; the logits are overwritten, as in Megatron's CE).
        with_entropy: also report the entropy of the predicted distribution (costs one more
            multiply-add pass over the shard and an fp32 element in the all-reduce).
        vocab_size: the real vocabulary when the logits carry padding rows (ids >= vocab_size,
            added for TP divisibility): they get no probability and no gradient. None: all ids.

    Returns:
        loss: fp32 per-token loss in the target's shape, differentiable w.r.t. logits; no
            masking, no reduction.
        stats: dict of detached fp32 tensors in the target's shape: ce, p_target, topk_mass
            (global top-k probability mass), mask (1.0 where the SED penalty applies), correct
            (1.0 where the target's logit is the largest), entropy (nats) when asked for, then
            the kind's own reports (`LossKind.reports`; SED: penalty = lam * M * (p - 0.5)^2).
            Ignored positions have 0 in every stat but topk_mass and entropy.
    """
    _validate_inputs(logits, target, cfg)
    _, world_size = group_rank_and_size(tp_group)
    padded_size = logits.size(-1) * world_size
    if vocab_size is None:
        vocab_size = padded_size
    elif not 0 < vocab_size <= padded_size:
        raise ValueError(f"sft_token_loss: vocab_size {vocab_size} must lie in (0, {padded_size}] (the logits' ids)")
    validate_target_ids(target, cfg, vocab_size)
    # Tokens flat: a view when contiguous (so inplace still reaches the caller's storage), else a copy.
    flat_logits, flat_target = logits.reshape(-1, logits.size(-1)), target.reshape(-1)  # [t, V/tp], [t]
    loss, *stat_values = _VocabParallelSFTLoss.apply(flat_logits, flat_target, cfg, tp_group, inplace,
                                                     with_entropy, vocab_size)
    names = loss_math.stat_names(get_kind(cfg.kind), with_entropy)
    return loss.view(target.shape), {name: value.view(target.shape) for name, value in zip(names, stat_values)}
