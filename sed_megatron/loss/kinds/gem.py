"""GEM (Li et al. 2024, h = "linear"): -sum_j q_j (log p_y - log p_j), q = sg(softmax(z / beta)).

Since log p_y - log p_j = z_y - z_j, the loss is sum_j q_j z_j - z_y and its gradient is
q - onehot(y): GEM's own form, the tempered softmax. Vocab-parallel, with x = z - m and
a_j = exp(x_j / beta) (so q = a / sum a), it needs two extra sums: sum_j a_j and sum_j a_j x_j.
The backward gets a_j from the kept exp(x) buffer as exp(x_j)^(1 / beta), in place.
"""

import torch

from .base import KindLoss, LossKind, distribution_minus_onehot_
from .registry import register


@register
class GEM(LossKind):
    name = "gem"

    def sum_names(self, cfg):
        return ("tempered_sum", "tempered_dot")

    def partial_sums(self, cfg, x, x_target):
        tempered = torch.div(x, cfg.gem_beta).exp_()  # a_j, [r, V/tp]
        return torch.stack([tempered.sum(dim=-1), torch.linalg.vecdot(tempered, x)])

    def token_loss(self, cfg, terms):
        tempered_sum, tempered_dot = terms.sums.extra
        valid = terms.valid
        return KindLoss(
            loss=torch.where(valid, tempered_dot / tempered_sum - terms.sums.target_logit, 0.0),
            grad_scale=valid.float(),
            mask=terms.ce.new_zeros(terms.ce.shape),
            reports={},
        )

    def gradient_(self, cfg, exp_x, sums, coef, index, in_shard):
        exp_x.pow_(1.0 / cfg.gem_beta)  # exp(x)^(1/beta) = a
        return distribution_minus_onehot_(exp_x, sums.extra[0], coef, coef, index, in_shard)
