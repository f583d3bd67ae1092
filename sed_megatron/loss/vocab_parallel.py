"""The vocab-parallel SFT token loss: one autograd Function that owns the collectives.

Collectives per call over `tp_group` (none when it is None or has one rank):
  1. all-gather of each rank's top-k logits: `[s, b, k]` fp32 per rank (k values per token);
     the global top-k and the global max come from the gathered candidates.
  2. all-reduce (sum) of the packed per-token partial sums: `[3, s, b]` fp32 (target logit,
     sum of exp), one more row with the entropy, two more for GEM.
Megatron's vocab_parallel_cross_entropy does three all-reduces of `[s, b]`.

Memory: one fp32 `[s, b, V/tp]` buffer, as in Megatron's CE. It holds exp(z - m) from forward
to backward and becomes the gradient in place. With fp32 logits and inplace=True the buffer is
the caller's logits tensor (Megatron's convention: the logits are overwritten), otherwise a copy.
"""

import torch
import torch.distributed as dist

from . import math as loss_math
from .config import IGNORE_INDEX, LossConfig


def _group_rank_and_size(tp_group):
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _all_gather_last_dim(tensor, tp_group, world_size):
    """[..., n] on every rank -> [..., world_size * n] in rank order."""
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous(), group=tp_group)
    return torch.cat(gathered, dim=-1)


class _VocabParallelSFTLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, cfg: LossConfig, tp_group, inplace, with_entropy, vocab_size):
        rank, world_size = _group_rank_and_size(tp_group)
        distributed = world_size > 1
        shard_size = logits.size(-1)
        vocab_start = rank * shard_size
        # Ids >= vocab_size are padding rows of the embedding (TP divisibility): not tokens.
        real = max(0, min(shard_size, vocab_size - vocab_start))

        # Top-k candidates straight from the input dtype (exact: bf16 values are fp32 values).
        candidates = loss_math.local_topk_candidates(logits[..., :real], cfg.top_k, shard_size)  # [s, b, k']
        if distributed:
            candidates = _all_gather_last_dim(candidates, tp_group, world_size)  # [s, b, tp*k']
        topk_logits = loss_math.global_topk(candidates, cfg.top_k)  # [s, b, k]
        logits_max = topk_logits.amax(dim=-1, keepdim=True)  # [s, b, 1]

        # The one fp32 [s, b, V/tp] buffer: x = z - m, then exp(x) in place, kept for backward.
        # With fp32 logits and inplace it is the caller's tensor (Megatron's convention). A mixed
        # bf16 - fp32 subtraction would materialize a promoted copy on CPU: convert, then shift.
        buffer = logits.to(torch.float32, copy=not inplace).sub_(logits_max)
        if real < shard_size:
            # exp() = 0: no probability, no gradient. Finite, so 0 * x stays 0 in the sums.
            buffer[..., real:] = torch.finfo(torch.float32).min
        index, in_shard = loss_math.shard_target_index(target, vocab_start, vocab_start + shard_size)
        target_logit = torch.where(in_shard, buffer.gather(-1, index.unsqueeze(-1)).squeeze(-1), 0.0)
        gem_beta = cfg.gem_beta if cfg.kind == "gem" else None
        sums = loss_math.exp_and_partial_sums_(buffer, with_entropy, gem_beta)  # [n, s, b]
        partial = torch.cat([target_logit.unsqueeze(0), sums])
        if distributed:
            dist.all_reduce(partial, group=tp_group)
        target_logit, sum_exp = partial[0], partial[1]
        sum_exp_x = partial[2] if with_entropy else None
        gem_sums = partial[-2:] if gem_beta is not None else None

        loss, grad_scale, stats = loss_math.token_losses(
            cfg, target, torch.log(sum_exp), target_logit, topk_logits - logits_max, sum_exp_x, gem_sums
        )
        ctx.cfg = cfg
        ctx.input_dtype = logits.dtype
        norm = gem_sums[0] if gem_sums is not None else sum_exp
        ctx.save_for_backward(buffer, norm, grad_scale, index, in_shard)
        stat_values = tuple(stats.values())
        ctx.mark_non_differentiable(*stat_values)
        return (loss, *stat_values)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        buffer, norm, grad_scale, index, in_shard = ctx.saved_tensors
        coef = grad_loss.float() * grad_scale
        if ctx.cfg.kind == "gem":
            grad = loss_math.gem_gradient_(buffer, norm, ctx.cfg.gem_beta, coef, index, in_shard)
        else:
            grad = loss_math.scale_softmax_gradient_(buffer, norm, coef, index, in_shard)
        return grad.to(ctx.input_dtype), None, None, None, None, None, None


def _validate_inputs(logits, target, cfg, vocab_size):
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"sft_token_loss: cfg must be a LossConfig, got {type(cfg).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"sft_token_loss: logits must be a float tensor, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"sft_token_loss: logits must be [s, b, V/tp], got shape {tuple(logits.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"sft_token_loss: target must be int64 token ids, got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"sft_token_loss: target shape {tuple(target.shape)} does not match logits "
            f"{tuple(logits.shape)} (expected target [s, b] = {tuple(logits.shape[:-1])})"
        )
    if cfg.top_k > vocab_size:
        raise ValueError(f"LossConfig.top_k: {cfg.top_k} exceeds the vocabulary size {vocab_size}")
    bad = ((target < 0) & (target != IGNORE_INDEX)) | (target >= vocab_size)
    if bool(bad.any()):  # one device sync per call; a wrong id would otherwise give a silent zero
        bad_id = int(target[bad][0])
        raise ValueError(
            f"sft_token_loss: target id {bad_id} is outside the vocabulary [0, {vocab_size}) "
            f"(and not the ignore index {IGNORE_INDEX})"
        )


def sft_token_loss(logits, target, cfg: LossConfig, tp_group=None, *, inplace=False, with_entropy=False,
                   vocab_size=None):
    """Per-token SFT loss of one vocab shard, exact under tensor parallelism.

    Args:
        logits: `[s, b, V/tp]` float (any dtype), this rank's contiguous vocab shard
            (rank r holds ids [r V/tp, (r+1) V/tp)); may be an autograd non-leaf.
        target: `[s, b]` int64 global token ids; IGNORE_INDEX (-100) gives loss 0 and no gradient.
        cfg: the LossConfig.
        tp_group: the tensor-parallel process group; None means a single process (no collectives).
        inplace: with fp32 logits, reuse the logits' storage as the working buffer (saves one
            `[s, b, V/tp]` fp32 tensor; the logits are overwritten, as in Megatron's CE).
        with_entropy: also report the entropy of the predicted distribution (costs one more
            multiply-add pass over the shard and an fp32 element in the all-reduce).
        vocab_size: the real vocabulary when the logits carry padding rows (ids >= vocab_size,
            added for TP divisibility): they get no probability and no gradient. None: all ids.

    Returns:
        loss: `[s, b]` fp32 per-token loss, differentiable w.r.t. logits; no masking, no reduction.
        stats: dict of detached `[s, b]` fp32 tensors: ce, p_target, topk_mass (global top-k
            probability mass), mask (1.0 where the SED penalty applies), correct (1.0 where the
            target's logit is the largest), and entropy (nats) when asked for. Ignored
            positions have ce = p_target = mask = correct = 0.
    """
    _, world_size = _group_rank_and_size(tp_group)
    padded_size = logits.size(-1) * world_size
    if vocab_size is None:
        vocab_size = padded_size
    elif not 0 < vocab_size <= padded_size:
        raise ValueError(f"sft_token_loss: vocab_size {vocab_size} must lie in (0, {padded_size}] (the logits' ids)")
    _validate_inputs(logits, target, cfg, vocab_size)
    loss, *stat_values = _VocabParallelSFTLoss.apply(logits, target, cfg, tp_group, inplace, with_entropy, vocab_size)
    names = loss_math.STAT_NAMES + (("entropy",) if with_entropy else ())
    return loss, dict(zip(names, stat_values))
