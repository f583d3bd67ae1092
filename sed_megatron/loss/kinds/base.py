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

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

TEMPERED_SUMS = ("tempered_sum", "tempered_dot")
"""The extra sums of a softmax-form kind with T != 1: sum_j exp(x_j / T) and sum_j exp(x_j / T) x_j."""


@dataclass(frozen=True)
class Param:
    """A hyper-parameter a loss kind declares: a LossConfig field, a command-line flag and a YAML
    `loss:` key (the field's name), validated wherever a LossConfig is made."""

    name: str
    """The LossConfig field and the YAML key."""
    default: object
    flag: str
    """The command-line flag (--sed-tau)."""
    help: str
    type: type = float
    choices: tuple | None = None
    check: Callable[[object], str | None] | None = None
    """value -> what is wrong with it, or None (choices are checked without it)."""

    def problem(self, value):
        """What is wrong with value for this parameter, or None."""
        if self.choices is not None:
            if value not in self.choices:
                return f"{value!r} is not one of {', '.join(map(str, self.choices))}"
            return None
        return self.check(value) if self.check is not None else None


def finite_number(low, high=None, low_open=False, allow_none=False):
    """A Param check: a finite number in [low, high] ((low, high] with low_open); None if allowed."""
    def check(value):
        if value is None and allow_none:
            return None
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > low if low_open else value >= low) and (high is None or value <= high))
        if ok:
            return None
        if high is not None:
            return f"must lie in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}"
        return f"must be a finite number {'>' if low_open else '>='} {low:g}, got {value!r}"
    return check


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
    params: tuple[Param, ...] = ()
    """Its hyper-parameters: LossConfig fields, flags and YAML keys (`loss/config.py`, the training
    arguments and the metrics loop over the registry; nothing else names a kind)."""
    reports: tuple[str, ...] = ()
    """Names of the extra per-token stats the kind adds to the standard ones (all detached); each
    is logged as "<kind> <stat>" (metrics.jsonl: "<kind>_<stat>")."""

    def validate(self, cfg):
        """Checks that span fields of the LossConfig (each field's own check is its Param's);
        errors name the field."""

    def uses_tau(self, cfg) -> bool:
        """Whether the kind reads LossConfig.tau (the threshold on the top-k mass that tau
        calibration sets before the first step)."""
        return False

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
