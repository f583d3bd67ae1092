"""Collective-free math of the vocab-parallel SFT losses, shared by every loss kind.

Every function here sees one rank's vocabulary shard and returns per-token partial results
that are either final or summed across the tensor-parallel group by the caller
(`vocab_parallel.py`); what differs between kinds lives in `kinds/`. Tokens are flat: logits
`[t, V/tp]`, per-token tensors `[t]`, whatever the caller's layout (`[s, b]` or `[b, s]`).
Passes that need temporaries of the shard's shape run chunk by chunk of tokens (`chunks.py`).
"""

from typing import NamedTuple

import torch

from .chunks import token_chunks
from .config import IGNORE_INDEX
from .kinds import KindLoss, LossKind, TokenSums, TokenTerms

STAT_NAMES = ("ce", "p_target", "topk_mass", "mask", "correct")
"""Per-token stats every loss kind reports, in this order ("entropy" follows when asked for,
then the kind's own reports, e.g. SED's "penalty")."""


class LocalStats(NamedTuple):
    """Per token `[c]`, fp32, of a chunk on this shard, relative to the shard's own max m_l: what a
    softmax-form kind's loss needs before any collective (`rescale_partial_sums` makes them global)."""

    local_max: torch.Tensor
    """m_l (-inf where the shard has no real id)."""
    sum_exp: torch.Tensor
    """sum_j exp(z_j - m_l)."""
    sum_exp_x: torch.Tensor | None
    """sum_j exp(z_j - m_l) (z_j - m_l) (with the entropy), else None."""
    tempered: tuple | None
    """(sum_j exp((z_j - m_l) / T), sum_j exp((z_j - m_l) / T) (z_j - m_l)) for T != 1, else None."""
    candidates: torch.Tensor
    """`[c, count]` the shard's largest logits (-inf where it has fewer real ids)."""
    target_logit: torch.Tensor
    """z_y where the target lies in this shard, else 0."""


def stat_names(kind: LossKind, with_entropy):
    """The stats' names in the order the loss returns them."""
    return STAT_NAMES + (("entropy",) if with_entropy else ()) + kind.reports


def shard_target_index(target, vocab_start, vocab_end):
    """Index of each target inside this shard (`[t]` int64, 0 where absent) and where it is present."""
    in_shard = (target >= vocab_start) & (target < vocab_end)
    index = torch.where(in_shard, target - vocab_start, torch.zeros_like(target))
    return index, in_shard


def local_target_logit(logits, index, in_shard):
    """z_y as fp32 where the target lies in this shard, else 0 (`[t]`): summed over ranks, z_y exactly."""
    return torch.where(in_shard, logits.gather(-1, index.unsqueeze(-1)).squeeze(-1).float(), 0.0)


def shifted_target_logit(target, target_logit, logits_max):
    """x_y = z_y - m `[t]` from the global z_y and max m, 0 at ignored positions."""
    return torch.where(target != IGNORE_INDEX, target_logit - logits_max, 0.0)


def local_topk_candidates(logits, top_k, shard_size):
    """The k largest logits of this shard as fp32, `[t, min(k, V/tp)]`: candidates of the global top-k.

    logits `[t, V']` may be a narrower view than the shard (padding ids cut off); missing
    candidates are -inf, so every rank contributes the same number to the all-gather. An fp32
    working buffer (never the caller's tensor) with k = 2 takes the max, blanks it for a second
    max and writes it back bit for bit: two passes at about half of torch.topk's time on the CPU.
    """
    count = min(top_k, shard_size)
    if logits.size(-1) == 0:
        return torch.full((*logits.shape[:-1], count), float("-inf"), dtype=torch.float32, device=logits.device)
    if top_k == 1:  # amax is several times faster than topk
        values = logits.amax(dim=-1, keepdim=True).float()
    elif top_k == 2 and logits.size(-1) >= 2 and logits.dtype == torch.float32:
        first, where = logits.max(dim=-1, keepdim=True)
        logits.scatter_(-1, where, float("-inf"))
        second = logits.amax(dim=-1, keepdim=True)
        logits.scatter_(-1, where, first)
        values = torch.cat([first, second], dim=-1)
    else:
        values = logits.topk(min(top_k, logits.size(-1)), dim=-1, sorted=False).values.float()
    if values.size(-1) < count:
        pad = values.new_full((*values.shape[:-1], count - values.size(-1)), float("-inf"))
        values = torch.cat([values, pad], dim=-1)
    return values


def global_topk(candidates, top_k):
    """The k largest of all ranks' candidates `[t, tp * k']` -> `[t, k]`."""
    if candidates.size(-1) == top_k:
        return candidates
    return candidates.topk(top_k, dim=-1, sorted=False).values


PADDING_LOGIT = -1e30
"""What padding ids (>= the real vocabulary) hold in the shifted buffer: exp() of it, or of it
divided by a temperature, is 0, and it is finite, so 0 * x stays 0 in the sums (the most negative
float would become -inf divided by a temperature below 1, and 0 * -inf is NaN)."""


def shift_chunk_(chunk, logits_max, real):
    """In place: a chunk z `[r, V/tp]` of the working buffer -> x = z - m, padding ids at PADDING_LOGIT."""
    chunk.sub_(logits_max.unsqueeze(-1))
    if real < chunk.size(-1):
        chunk[:, real:] = PADDING_LOGIT
    return chunk


def exp_and_partial_sums_(buffer, logits_max, real, target_shifted, kind: LossKind, cfg, with_entropy):
    """In place: the working buffer z `[t, V/tp]` -> x = z - m -> the kind's kept buffer; returns
    this shard's partial sums `[n, t]`.

    Rows: sum_j exp(x_j); then sum_j exp(x_j) x_j (the entropy's, if with_entropy); then the
    kind's extra sums (`kind.sum_names(cfg)`), which may need x_y (target_shifted `[t]`). The kept
    buffer is exp(x / T) for a softmax-form kind (`LossKind.temperature`), else exp(x). logits_max
    `[t]` is the m to shift by; real: the shard's columns that are tokens.
    Every step runs chunk by chunk of tokens (`chunks.token_chunks`), so that on the CPU a chunk's
    passes (the shift, the exponential, the sums) stay in the caches: the buffer crosses memory
    once instead of once per pass. Temporaries are one chunk's.
    """
    temperature = kind.temperature(cfg)
    num_extra = len(kind.sum_names(cfg))
    num_tokens, shard_size = buffer.shape
    first_extra = 1 + int(with_entropy)
    sums = torch.empty((first_extra + num_extra, num_tokens), dtype=torch.float32, device=buffer.device)
    slices = token_chunks(num_tokens, shard_size, buffer.device)
    work = torch.empty((slices[0].stop - slices[0].start, shard_size), dtype=torch.float32, device=buffer.device) \
        if slices and (with_entropy or temperature != 1.0) else None  # one chunk-sized temporary, reused
    for rows in slices:
        chunk = shift_chunk_(buffer[rows], logits_max[rows], real)  # [r, V/tp], a view
        if temperature is None:
            sums[first_extra:, rows] = kind.partial_sums(cfg, chunk, target_shifted[rows])
        if temperature not in (None, 1.0):
            _tempered_sums_(chunk, temperature, sums[:, rows], with_entropy, work[:chunk.size(0)])
            continue
        if with_entropy:
            exp_chunk = torch.exp(chunk, out=work[:chunk.size(0)])
            sums[1, rows] = torch.linalg.vecdot(exp_chunk, chunk)
            chunk.copy_(exp_chunk)
        else:
            chunk.exp_()
        sums[0, rows] = chunk.sum(dim=-1)
    return sums


def _tempered_sums_(chunk, temperature, sums, with_entropy, work):
    """A softmax-form kind with T != 1 on a chunk x `[r, V/tp]`: sums[0] = sum exp(x), [sums[1] =
    sum exp(x) x], the last two rows sum exp(x / T) and sum exp(x / T) x; x becomes exp(x / T).
    work: a temporary of the chunk's shape."""
    torch.exp(chunk, out=work)
    sums[0] = work.sum(dim=-1)
    if with_entropy:
        sums[1] = torch.linalg.vecdot(work, chunk)
    torch.mul(chunk, 1.0 / temperature, out=work).exp_()  # a = exp(x / T)
    sums[-2] = work.sum(dim=-1)
    sums[-1] = torch.linalg.vecdot(work, chunk)
    chunk.copy_(work)


def keep_from_logits_(buffer, logits_max, real, kind: LossKind, cfg):
    """In place: the working buffer z `[t, V/tp]` -> the kind's kept buffer (exp((z - m) / T), or
    exp(z - m)); returns it. What exp_and_partial_sums_ leaves in the buffer, for a path that
    recomputes the logits (the fused loss's backward) and needs no sums."""
    temperature = kind.temperature(cfg)
    for rows in token_chunks(*buffer.shape, buffer.device):
        chunk = shift_chunk_(buffer[rows], logits_max[rows], real)
        if temperature not in (None, 1.0):
            chunk.mul_(1.0 / temperature)
        chunk.exp_()
    return buffer


def rescale_partial_sums(local_max, logits_max, sum_exp, sum_exp_x=None, tempered=None, temperature=1.0):
    """Sums taken relative to this shard's own max m_l -> relative to the global max m: `[n, t]`.

    With d = m_l - m <= 0: sum_j e^(z_j - m) = e^d S0 and sum_j e^(z_j - m) (z_j - m) =
    e^d (S1 + d S0), where S0, S1 are the sums relative to m_l (`[t]` fp32); the tempered sums
    of a softmax form with T != 1 (tempered = (A_l, D_l) relative to m_l) likewise with e^(d/T):
    A = e^(d/T) A_l, D = e^(d/T) (D_l + d A_l). A shard without a real id (m_l = -inf, S0 = 0)
    contributes 0. Rows as in exp_and_partial_sums_.
    """
    present = sum_exp > 0
    shift = torch.where(present, local_max - logits_max, 0.0)
    rescale = torch.where(present, torch.exp(shift), 0.0)
    rows = [rescale * sum_exp]
    if sum_exp_x is not None:
        rows.append(rescale * (sum_exp_x + shift * sum_exp))
    if tempered is not None:
        tempered_sum, tempered_dot = tempered
        tempered_rescale = torch.where(present, torch.exp(shift / temperature), 0.0)
        rows += [tempered_rescale * tempered_sum, tempered_rescale * (tempered_dot + shift * tempered_sum)]
    return torch.stack(rows)


def split_sums(partial, with_entropy):
    """The reduced `[n, t]` of exp_and_partial_sums_ -> (sum_exp `[t]`, entropy's sum `[t]` or None, extra `[n', t]`)."""
    sum_exp_x = partial[1] if with_entropy else None
    return partial[0], sum_exp_x, partial[1 + int(with_entropy):]


def token_terms(target, sums: TokenSums, topk_shifted) -> TokenTerms:
    """The per-token terms every kind reads, from the global sums and top-k logits minus m `[t, k]`."""
    valid = target != IGNORE_INDEX
    log_sum_exp = torch.log(sums.sum_exp)
    ce = torch.where(valid, log_sum_exp - sums.target_logit, 0.0)
    return TokenTerms(
        sums=sums,
        valid=valid,
        log_sum_exp=log_sum_exp,
        ce=ce,
        p_target=torch.where(valid, torch.exp(-ce), 0.0),
        topk_mass=torch.exp(topk_shifted - log_sum_exp.unsqueeze(-1)).sum(dim=-1),
    )


def token_stats(terms: TokenTerms, kind_loss: KindLoss, sum_exp_x=None):
    """The stats dict (detach them before use outside the loss): STAT_NAMES, entropy, the kind's reports."""
    stats = {
        "ce": terms.ce,
        "p_target": terms.p_target,
        "topk_mass": terms.topk_mass,
        "mask": kind_loss.mask,
        # The target is the argmax iff its logit equals the global max (ties count as correct).
        "correct": (terms.valid & (terms.sums.target_logit >= 0)).float(),
    }
    if sum_exp_x is not None:
        stats["entropy"] = terms.log_sum_exp - sum_exp_x / terms.sums.sum_exp
    stats.update(kind_loss.reports)
    return stats
