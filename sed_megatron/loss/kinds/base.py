"""What a loss kind is: the per-token strategy that the vocab-parallel loss runs for it.

A kind is collective-free math on one rank's vocab shard. The autograd Function
(`vocab_parallel.py`) runs the same steps for every kind and never branches on it:

  1. partial sums: `partial_sums(cfg, x, x_target)` on a chunk of tokens of the shifted shard
     x = z - m (m: the token's global max), for the extra per-token sums the kind needs
     (`sum_names(cfg)`) beyond sum_j exp(x_j), which every kind gets; the caller sums them over
     the tensor-parallel group with it. x_target = x_y is already global (it comes with the
     top-k all-gather), so a sum may depend on it.
  2. loss: `token_loss(cfg, terms)` from the globally reduced TokenTerms: the per-token loss,
     the per-token scale of the gradient form, the SED mask, and the kind's extra per-token
     reports (`reports`, e.g. SED's penalty), which the caller returns among the stats.
  3. gradient: `gradient_(cfg, exp_x, sums, coef, index, in_shard)` turns the kept exp(x)
     buffer, or a chunk of tokens of it, into coef * d loss / d z in place. The default form is
     the CE gradient times one number per token, coef * (softmax(z) - onehot(y)); GEM's is its
     tempered softmax, coef * (softmax(z / beta) - onehot(y)) (weighted with h = logsigmoid).

Shapes: t tokens (the caller's leading dims, flattened), V/tp the shard; `[r, ...]` a chunk of
r tokens. A kind sees only the LossConfig it is given, never a process group.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch


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

    def sum_names(self, cfg) -> tuple[str, ...]:
        """The extra per-token partial sums the kind needs, in the row order of `partial_sums`."""
        return ()

    def partial_sums(self, cfg, x, x_target):
        """This shard's extra sums `[n, r]` for a chunk x `[r, V/tp]` (fp32, z - m) and x_target `[r]`.

        x holds the shifted logits (padding ids at the most negative float). It must be left
        unchanged; temporaries of x's size are fine (the caller bounds the chunk).
        """
        return x.new_empty((0, x.size(0)))

    def token_loss(self, cfg, terms: TokenTerms) -> KindLoss:
        """Per-token loss, gradient scale, SED mask and reports from the global terms."""
        raise NotImplementedError(f"loss kind {self.name!r} defines no token_loss")

    def gradient_(self, cfg, exp_x, sums: TokenSums, coef, index, in_shard):
        """In place: exp_x = exp(z - m) `[r, V/tp]` -> coef * (softmax(z) - onehot(y)); returns it.

        coef `[r]` is grad_output times the kind's grad_scale; index `[r]` the target's column in
        this shard and in_shard `[r]` whether it lies here (`math.shard_target_index`).
        """
        return distribution_minus_onehot_(exp_x, sums.sum_exp, coef, coef, index, in_shard)


def distribution_minus_onehot_(weights, normalizer, coef, target_coef, index, in_shard):
    """In place: weights `[r, V/tp]` -> coef * weights / normalizer - target_coef * onehot(y); returns it.

    With weights = exp(z - m) and normalizer = their global sum this is the CE gradient form.
    """
    weights.mul_((coef / normalizer).unsqueeze(-1))
    weights.scatter_add_(-1, index.unsqueeze(-1), -(target_coef * in_shard).unsqueeze(-1))
    return weights
