"""GEM (Li et al. 2024, github liziniu/GEM): -sum_j q_j w_j (log p_y - log p_j), q = sg(softmax(z / beta)).

Since log p_y - log p_j = z_y - z_j, the loss is sum_j q_j w_j (z_j - z_y), with the detached
weights of GEM's function h (LossConfig.gem_h), one strategy each:

    linear:      w_j = 1: the loss is sum_j q_j z_j - z_y, the gradient q - onehot(y), GEM's
                 tempered softmax form (SED-SFT's GEM baseline): a softmax-form kind with
                 T = beta, which the shared code runs as fast as CE (`base.LossKind`).
    logsigmoid:  w_j = sg(sigmoid(0.01 (z_j - z_y))): the gradient is q w - S onehot(y),
                 S = sum_j q_j w_j (w_y = 1/2). GEM's own training scripts use it.

Vocab-parallel, with x = z - m and a_j = exp(x_j / beta) (so q = a / A, A = sum_j a_j), the
extra sums are A and sum_j a_j x_j (linear: base.TEMPERED_SUMS), or A, S A = sum_j a_j w_j and
sum_j a_j w_j (x_j - x_y) (logsigmoid; x_y comes with the top-k all-gather, before the sums).
With logsigmoid the backward gets a from the kept exp(x) buffer as exp(x)^(1 / beta), in place,
and w from log(exp(x)) (an fp32 exp(x) that underflows gives w = 0, where a is already 0 for
beta <= 1).
"""

import torch

from ..chunks import token_chunks
from .base import KindLoss, LossKind, Param, distribution_minus_onehot_, finite_number
from .registry import register

SIGMOID_SCALE = 0.01
"""The 0.01 in GEM's logsigmoid weights sigmoid(0.01 (z_j - z_y))."""


def _logsigmoid_weights_(shifted, x_target):
    """In place: shifted x `[r, V/tp]` (or log exp(x)) -> w = sigmoid(0.01 (x - x_y)); returns it."""
    return shifted.sub_(x_target.unsqueeze(-1)).mul_(SIGMOID_SCALE).sigmoid_()


class _LinearH:
    """w = 1: the tempered softmax form, T = beta."""

    @staticmethod
    def temperature(cfg):
        return cfg.gem_beta

    @staticmethod
    def loss(cfg, terms):
        extra = terms.sums.extra
        return extra[1] / extra[0] - terms.sums.target_logit  # sum_j q_j x_j - x_y


class _LogSigmoidH:
    """w = sigmoid(0.01 (z - z_y)): its own sums and gradient."""

    @staticmethod
    def temperature(cfg):
        return None

    @staticmethod
    def sum_names(cfg):
        return ("tempered_sum", "weighted_sum", "weighted_dot")

    @staticmethod
    def partial_sums(cfg, x, x_target):
        tempered = torch.div(x, cfg.gem_beta).exp_()  # a_j, [r, V/tp]
        tempered_sum = tempered.sum(dim=-1)
        difference = torch.sub(x, x_target.unsqueeze(-1))  # x_j - x_y, [r, V/tp]
        tempered.mul_(torch.mul(difference, SIGMOID_SCALE).sigmoid_())  # a_j w_j
        return torch.stack([tempered_sum, tempered.sum(dim=-1), torch.linalg.vecdot(tempered, difference)])

    @staticmethod
    def loss(cfg, terms):
        extra = terms.sums.extra
        return extra[2] / extra[0]  # sum_j q_j w_j (x_j - x_y)

    @staticmethod
    def gradient_(cfg, exp_x, sums, coef, index, in_shard):
        tempered_sum = sums.extra[0]
        for rows in token_chunks(*exp_x.shape, exp_x.device):  # w needs a temporary of the chunk's size
            chunk = exp_x[rows]
            weights = _logsigmoid_weights_(torch.log(chunk), sums.target_logit[rows])
            chunk.pow_(1.0 / cfg.gem_beta).mul_(weights)  # a w
            del weights
        return distribution_minus_onehot_(exp_x, tempered_sum, coef, coef * sums.extra[1] / tempered_sum, index,
                                          in_shard)


H_STRATEGIES = {"linear": _LinearH, "logsigmoid": _LogSigmoidH}
"""LossConfig.gem_h -> its strategy."""


@register
class GEM(LossKind):
    name = "gem"
    params = (
        Param("gem_beta", 0.7, "--gem-beta", "GEM temperature beta of q = softmax(z / beta) (published: 0.7)",
              check=finite_number(0.0, low_open=True)),
        Param("gem_h", "linear", "--gem-h", "GEM's h: linear (SED-SFT's GEM baseline) or logsigmoid (GEM's own "
              "repository)", type=str, choices=tuple(H_STRATEGIES)),
    )

    def temperature(self, cfg):
        return H_STRATEGIES[cfg.gem_h].temperature(cfg)

    def sum_names(self, cfg):
        h = H_STRATEGIES[cfg.gem_h]
        return h.sum_names(cfg) if hasattr(h, "sum_names") else super().sum_names(cfg)

    def partial_sums(self, cfg, x, x_target):
        return H_STRATEGIES[cfg.gem_h].partial_sums(cfg, x, x_target)

    def token_loss(self, cfg, terms):
        valid = terms.valid
        return KindLoss(
            loss=torch.where(valid, H_STRATEGIES[cfg.gem_h].loss(cfg, terms), 0.0),
            grad_scale=valid.float(),
            mask=terms.ce.new_zeros(terms.ce.shape),
            reports={},
        )

    def gradient_(self, cfg, kept, sums, coef, index, in_shard):
        h = H_STRATEGIES[cfg.gem_h]
        if hasattr(h, "gradient_"):
            return h.gradient_(cfg, kept, sums, coef, index, in_shard)
        return super().gradient_(cfg, kept, sums, coef, index, in_shard)
