"""Collective-free math of the vocab-parallel SFT losses.

Every function here sees one rank's vocabulary shard and returns per-token partial results
that are either final or summed across the tensor-parallel group by the caller
(`vocab_parallel.py`). Shapes: logits `[s, b, V/tp]`, per-token tensors `[s, b]`.

The gradient of CE, SED and DFT with respect to the logits is the CE gradient times one number
per token (p = exp(-CE), M the SED mask):

    d/dz [CE + lam M (p - 0.5)^2] = (1 - 2 lam M p (p - 0.5)) (softmax(z) - onehot(y))
    d/dz [sg(p) CE]               = p (softmax(z) - onehot(y))

so one softmax buffer serves all three; GEM (linear h) has the gradient q - onehot(y) with
q = softmax(z / beta), which the same buffer gives as q ∝ exp(z - m)^(1 / beta).
"""

import torch

from .config import IGNORE_INDEX, LossConfig

STAT_NAMES = ("ce", "p_target", "topk_mass", "mask", "correct")
"""Per-token stats every loss kind reports, in this order ("entropy" follows when asked for)."""

_CHUNK_ELEMENTS = 1 << 22
"""Elements per chunk of the passes that need temporaries of the shard's size (16 MiB fp32)."""


def shard_target_index(target, vocab_start, vocab_end):
    """Index of each target inside this shard ([s, b] int64, 0 where absent) and where it is present."""
    in_shard = (target >= vocab_start) & (target < vocab_end)
    index = torch.where(in_shard, target - vocab_start, torch.zeros_like(target))
    return index, in_shard


def local_topk_candidates(logits, top_k, shard_size):
    """The k largest logits of this shard as fp32, `[s, b, min(k, V/tp)]`: candidates of the global top-k.

    logits may be a narrower view than the shard (padding ids cut off); missing candidates are
    -inf, so every rank contributes the same number to the all-gather.
    """
    count = min(top_k, shard_size)
    if logits.size(-1) == 0:
        return torch.full((*logits.shape[:-1], count), float("-inf"), dtype=torch.float32, device=logits.device)
    if top_k == 1:  # amax is several times faster than topk
        values = logits.amax(dim=-1, keepdim=True).float()
    else:
        values = logits.topk(min(top_k, logits.size(-1)), dim=-1, sorted=False).values.float()
    if values.size(-1) < count:
        pad = values.new_full((*values.shape[:-1], count - values.size(-1)), float("-inf"))
        values = torch.cat([values, pad], dim=-1)
    return values


def global_topk(candidates, top_k):
    """The k largest of all ranks' candidates `[s, b, tp * k']` -> `[s, b, k]`."""
    if candidates.size(-1) == top_k:
        return candidates
    return candidates.topk(top_k, dim=-1, sorted=False).values


def exp_and_partial_sums_(shifted, with_entropy, gem_beta):
    """In place x -> exp(x) for x = z - m `[s, b, V/tp]`; returns this shard's partial sums `[n, s, b]`.

    Rows: sum_j e_j; then sum_j e_j x_j (the entropy's, if with_entropy); then
    sum_j exp(x_j / beta) and sum_j exp(x_j / beta) x_j (GEM's, if gem_beta is not None).
    The extra sums need x and its exponential at once, so they run chunk by chunk along s with
    chunk-sized temporaries; without them the exponential is a single in-place pass.
    """
    if not with_entropy and gem_beta is None:
        return shifted.exp_().sum(dim=-1).unsqueeze(0)
    num_sums = 1 + int(with_entropy) + 2 * int(gem_beta is not None)
    sums = torch.empty((num_sums,) + shifted.shape[:-1], dtype=torch.float32, device=shifted.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, shifted[0].numel()))
    for start in range(0, shifted.size(0), rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        chunk = shifted[rows]
        row = 1
        if gem_beta is not None:
            weights = torch.exp(chunk / gem_beta)
            sums[-2, rows] = weights.sum(dim=-1)
            sums[-1, rows] = torch.linalg.vecdot(weights, chunk)
            del weights
        exp_chunk = torch.exp(chunk)
        if with_entropy:
            sums[row, rows] = torch.linalg.vecdot(exp_chunk, chunk)
        chunk.copy_(exp_chunk)
        sums[0, rows] = exp_chunk.sum(dim=-1)
    return sums


def token_losses(cfg: LossConfig, target, log_sum_exp, target_logit, topk_shifted, sum_exp_x=None, gem_sums=None):
    """Per-token loss, per-token gradient scale and stats from globally reduced partial results.

    All inputs are global (already summed over the tensor-parallel group) and shifted by the
    global max m: log_sum_exp = log sum_j exp(z_j - m), target_logit = z_y - m,
    topk_shifted = the global top-k logits minus m `[s, b, k]`, sum_exp_x = sum_j e_j (z_j - m)
    (gives the entropy stat) or None, gem_sums = (sum_j exp((z_j - m) / beta),
    sum_j exp((z_j - m) / beta) (z_j - m)) for GEM, else None.

    Returns loss `[s, b]`, grad_scale `[s, b]` (the CE-gradient multiplier; for GEM the
    multiplier of q - onehot), and the stats dict. Ignored positions get loss 0 and scale 0.
    """
    valid = target != IGNORE_INDEX
    zero = torch.zeros_like(log_sum_exp)
    ce = torch.where(valid, log_sum_exp - target_logit, zero)
    p_target = torch.where(valid, torch.exp(-ce), zero)
    sum_exp = torch.exp(log_sum_exp)
    topk_mass = torch.exp(topk_shifted - log_sum_exp.unsqueeze(-1)).sum(dim=-1)

    if cfg.kind == "sed":
        mask = valid if cfg.mask == "none" else valid & (topk_mass < cfg.tau)
        mask = mask.float()
    else:
        mask = zero

    if cfg.kind == "ce":
        loss, grad_scale = ce.clone(), valid.float()  # a stat must not alias the loss
    elif cfg.kind == "dft":
        loss, grad_scale = p_target * ce, p_target
    elif cfg.kind == "sed":
        weight = cfg.lam * mask
        penalty = weight * (p_target - 0.5) ** 2
        loss = ce + penalty
        grad_scale = torch.where(valid, 1.0 - 2.0 * weight * p_target * (p_target - 0.5), zero)
    else:  # gem: sum_j q_j z_j - z_y
        loss = torch.where(valid, gem_sums[1] / gem_sums[0] - target_logit, zero)
        grad_scale = valid.float()

    stats = {
        "ce": ce,
        "p_target": p_target,
        "topk_mass": topk_mass,
        "mask": mask,
        # The target is the argmax iff its logit equals the global max (ties count as correct).
        "correct": (valid & (target_logit >= 0)).float(),
    }
    if sum_exp_x is not None:
        stats["entropy"] = log_sum_exp - sum_exp_x / sum_exp
    return loss, grad_scale, stats


def scale_softmax_gradient_(exp_shifted, sum_exp, coef, index, in_shard):
    """In place: exp(z - m) -> coef * (softmax(z) - onehot(y)) on this shard; returns the buffer."""
    exp_shifted.mul_((coef / sum_exp).unsqueeze(-1))
    exp_shifted.scatter_add_(-1, index.unsqueeze(-1), -(coef * in_shard).unsqueeze(-1))
    return exp_shifted


def gem_gradient_(exp_shifted, gem_weight_sum, beta, coef, index, in_shard):
    """In place: exp(z - m) -> coef * (softmax(z / beta) - onehot(y)) on this shard; returns the buffer."""
    exp_shifted.pow_(1.0 / beta)
    return scale_softmax_gradient_(exp_shifted, gem_weight_sum, coef, index, in_shard)
