"""What a loss kind is: the per-token strategy that the vocab-parallel loss runs for it.

A kind is collective-free math on one rank's vocab shard. The autograd Function
(`vocab_parallel.py`) runs the same steps for every kind and never branches on it:

  1. partial sums, on a chunk of tokens of the shifted shard x = z - m (m: the token's global
     max): sum_j exp(x_j), which every kind gets, and the extra per-token sums the kind needs
     (`sum_names(cfg)`); the caller sums them over the tensor-parallel group.
  2. loss: `token_loss(cfg, terms)` from the globally reduced TokenTerms: the per-token loss,
     the per-token scale of the gradient form, the SED mask, and the kind's extra per-token
     reports (`reports`, e.g. SED's penalty), which the caller returns among the stats.
  3. gradient: coef * d loss / d z, formed in place in the kept buffer of a chunk of tokens.

Most kinds' gradient is a softmax form, coef * (softmax(z / T) - onehot(y)), with a temperature
T that `temperature(cfg)` declares: T = 1 for CE, DFT and SED (the CE form times one number per
token), T = beta for GEM with h = linear (its tempered softmax). For those the shared code does
everything in its fastest form (one in-place pass where it can; the Triton kernels of the fused
loss; the partial sums relative to a rank's own max, rescaled, so that the fused loss needs one
collective round per micro-batch): the kept buffer holds exp(x / T), and a kind with T != 1
has the tempered sums TEMPERED_SUMS = (sum_j exp(x_j / T), sum_j exp(x_j / T) x_j) as its extra
sums. A kind of another form (`temperature` None) defines `partial_sums` and `gradient_`; its
kept buffer holds exp(x).

Shapes: t tokens (the caller's leading dims, flattened), V/tp the shard; `[r, ...]` a chunk of
r tokens. A kind sees only the LossConfig it is given, never a process group.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

TEMPERED_SUMS = ("tempered_sum", "tempered_dot")
"""The extra sums of a softmax-form kind with T != 1: sum_j exp(x_j / T) and sum_j exp(x_j / T) x_j."""


class TokenSums(NamedTuple):
    """Per-token results summed over the tensor-parallel group, fp32; what a gradient form needs."""

    sum_exp: torch.Tensor
    """`[t]` sum_j exp(x_j) over the whole vocabulary."""
    target_logit: torch.Tensor
    """`[t]` x_y = z_y - m, the target's shifted logit (0 at ignored positions)."""
    extra: torch.Tensor
    """`[n, t]` the kind's extra sums, in the order of its `sum_names(cfg)` (n may be 0)."""


@dataclass(frozen=True)
class TokenTerms:
    """What every kind's loss may read, per token `[t]`, fp32 unless said otherwise."""

    sums: TokenSums
    valid: torch.Tensor
    """bool: the target is not IGNORE_INDEX."""
    log_sum_exp: torch.Tensor
    """log sum_j exp(x_j)."""
    ce: torch.Tensor
    """-log p_y (0 where not valid)."""
    p_target: torch.Tensor
    """p_y = exp(-ce) (0 where not valid)."""
    topk_mass: torch.Tensor
    """P_topk: the global top-k probability mass."""


@dataclass(frozen=True)
class KindLoss:
    """A kind's per-token results `[t]` fp32; every tensor is new (they become separate outputs)."""

    loss: torch.Tensor
    """The per-token loss (0 where not valid)."""
    grad_scale: torch.Tensor
    """The per-token multiplier of the kind's gradient form (0 where not valid)."""
    mask: torch.Tensor
    """1.0 where the SED penalty applies; 0 for kinds without one."""
    reports: dict
    """name -> `[t]` tensor: the kind's extra per-token stats, one per name in `reports`."""


class LossKind:
    """A loss kind; subclasses set `name` and define `token_loss`, and more where they differ."""

    name: str = ""
    """The LossConfig.kind that selects it."""
    reports: tuple[str, ...] = ()
    """Names of the extra per-token stats the kind adds to the standard ones (all detached)."""

    def validate(self, cfg):
        """Checks of the LossConfig fields this kind reads; errors name the field."""

    def temperature(self, cfg) -> float | None:
        """T of a gradient coef * (softmax(z / T) - onehot(y)); None for a gradient of another form."""
        return 1.0

    def sum_names(self, cfg) -> tuple[str, ...]:
        """The extra per-token partial sums the kind needs, in the row order of `partial_sums`
        (TEMPERED_SUMS for a softmax form with T != 1, which the shared code computes)."""
        return TEMPERED_SUMS if self.temperature(cfg) not in (None, 1.0) else ()

    def partial_sums(self, cfg, x, x_target):
        """Another form's extra sums `[n, r]` for a chunk x `[r, V/tp]` (fp32, z - m) and x_target `[r]`.

        x holds the shifted logits (padding ids at the most negative float). It must be left
        unchanged; temporaries of x's size are fine (the caller bounds the chunk).
        """
        return x.new_empty((0, x.size(0)))

    def token_loss(self, cfg, terms: TokenTerms) -> KindLoss:
        """Per-token loss, gradient scale, SED mask and reports from the global terms."""
        raise NotImplementedError(f"loss kind {self.name!r} defines no token_loss")

    def gradient_(self, cfg, kept, sums: TokenSums, coef, index, in_shard):
        """In place: the kept buffer `[r, V/tp]` -> coef * d loss / d z; returns it.

        Softmax form: kept = exp(x / T) -> coef * (softmax(z / T) - onehot(y)). Another form
        (temperature None) overrides this; its kept buffer holds exp(x). coef `[r]` is
        grad_output times the kind's grad_scale; index `[r]` the target's column in this shard and
        in_shard `[r]` whether it lies here (`math.shard_target_index`).
        """
        normalizer = sums.sum_exp if self.temperature(cfg) == 1.0 else sums.extra[0]
        return distribution_minus_onehot_(kept, normalizer, coef, coef, index, in_shard)


def distribution_minus_onehot_(weights, normalizer, coef, target_coef, index, in_shard):
    """In place: weights `[r, V/tp]` -> coef * weights / normalizer - target_coef * onehot(y); returns it.

    With weights = exp(z - m) and normalizer = their global sum this is the CE gradient form.
    """
    weights.mul_((coef / normalizer).unsqueeze(-1))
    weights.scatter_add_(-1, index.unsqueeze(-1), -(target_coef * in_shard).unsqueeze(-1))
    return weights
