"""GEM (Li et al. 2024, github liziniu/GEM): -sum_j q_j w_j (log p_y - log p_j), q = sg(softmax(z / beta)).

Since log p_y - log p_j = z_y - z_j, the loss is sum_j q_j w_j (z_j - z_y), with the detached
weights of GEM's function h (LossConfig.gem_h):

    linear:      w_j = 1: the loss is sum_j q_j z_j - z_y, the gradient q - onehot(y), GEM's
                 tempered softmax form (SED-SFT's GEM baseline).
    logsigmoid:  w_j = sg(sigmoid(0.01 (z_j - z_y))): the gradient is q w - S onehot(y),
                 S = sum_j q_j w_j (w_y = 1/2). GEM's own training scripts use it.

Vocab-parallel, with x = z - m and a_j = exp(x_j / beta) (so q = a / A, A = sum_j a_j), the
extra sums are A and sum_j a_j x_j (linear), or A, S A = sum_j a_j w_j and
sum_j a_j w_j (x_j - x_y) (logsigmoid; x_y comes with the top-k all-gather, before the sums).
The backward gets a from the kept exp(x) buffer as exp(x)^(1 / beta), in place, and w from
log(exp(x)) (an fp32 exp(x) that underflows gives w = 0, where a is already 0 for beta <= 1).
"""

import torch

from ..chunks import token_chunks
from .base import KindLoss, LossKind, distribution_minus_onehot_
from .registry import register

SIGMOID_SCALE = 0.01
"""The 0.01 in GEM's logsigmoid weights sigmoid(0.01 (z_j - z_y))."""


def _logsigmoid_weights_(shifted, x_target):
    """In place: shifted x `[r, V/tp]` (or log exp(x)) -> w = sigmoid(0.01 (x - x_y)); returns it."""
    return shifted.sub_(x_target.unsqueeze(-1)).mul_(SIGMOID_SCALE).sigmoid_()


@register
class GEM(LossKind):
    name = "gem"

    def sum_names(self, cfg):
        if cfg.gem_h == "linear":
            return ("tempered_sum", "tempered_dot")
        return ("tempered_sum", "weighted_sum", "weighted_dot")

    def partial_sums(self, cfg, x, x_target):
        tempered = torch.div(x, cfg.gem_beta).exp_()  # a_j, [r, V/tp]
        if cfg.gem_h == "linear":
            return torch.stack([tempered.sum(dim=-1), torch.linalg.vecdot(tempered, x)])
        tempered_sum = tempered.sum(dim=-1)
        difference = torch.sub(x, x_target.unsqueeze(-1))  # x_j - x_y, [r, V/tp]
        tempered.mul_(torch.mul(difference, SIGMOID_SCALE).sigmoid_())  # a_j w_j
        return torch.stack([tempered_sum, tempered.sum(dim=-1), torch.linalg.vecdot(tempered, difference)])

    def token_loss(self, cfg, terms):
        extra, valid = terms.sums.extra, terms.valid
        if cfg.gem_h == "linear":
            loss = extra[1] / extra[0] - terms.sums.target_logit  # sum_j q_j x_j - x_y
        else:
            loss = extra[2] / extra[0]  # sum_j q_j w_j (x_j - x_y)
        return KindLoss(
            loss=torch.where(valid, loss, 0.0),
            grad_scale=valid.float(),
            mask=terms.ce.new_zeros(terms.ce.shape),
            reports={},
        )

    def gradient_(self, cfg, exp_x, sums, coef, index, in_shard):
        tempered_sum = sums.extra[0]
        if cfg.gem_h == "linear":
            exp_x.pow_(1.0 / cfg.gem_beta)  # a = exp(x)^(1/beta)
            return distribution_minus_onehot_(exp_x, tempered_sum, coef, coef, index, in_shard)
        for rows in token_chunks(*exp_x.shape):  # w needs a temporary of the chunk's size
            chunk = exp_x[rows]
            weights = _logsigmoid_weights_(torch.log(chunk), sums.target_logit[rows])
            chunk.pow_(1.0 / cfg.gem_beta).mul_(weights)  # a w
            del weights
        return distribution_minus_onehot_(exp_x, tempered_sum, coef, coef * sums.extra[1] / tempered_sum, index, in_shard)
