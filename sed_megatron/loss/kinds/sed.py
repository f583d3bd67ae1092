"""SED-SFT: CE + lam * M * (p_y - 0.5)^2, M = [P_topk < tau] (no gradient), or M = 1 with mask="none".

The gradient flows through p_y in the penalty and is the CE form times one number per token:
d/dz = (1 - 2 lam M p_y (p_y - 0.5)) (softmax(z) - onehot(y)).
"""

import torch

from .base import KindLoss, LossKind, Param, finite_number
from .registry import register

MASKS = ("topk_mass", "none")


@register
class SelectiveDiversity(LossKind):
    name = "sed"
    params = (
        Param("tau", None, "--sed-tau", "penalty where the top-k mass < tau (required with the topk_mass mask; "
              "tau calibration sets it)", check=finite_number(0.0, 1.0, low_open=True, allow_none=True)),
        Param("lam", 1.0, "--sed-lambda", "weight of the penalty (paper: 1)", check=finite_number(0.0)),
        Param("mask", "topk_mass", "--sed-mask", "where the penalty applies: topk_mass (the top-k mass below tau) or "
              "none (every token)", type=str, choices=MASKS),
    )
    reports = ("penalty",)
    """penalty: lam * M * (p_y - 0.5)^2, the part of the loss above CE."""

    def uses_tau(self, cfg):
        return cfg.mask == "topk_mass"

    def validate(self, cfg):
        if self.uses_tau(cfg) and cfg.tau is None:
            raise ValueError(
                "LossConfig.tau: SED with mask='topk_mass' needs tau "
                "(calibrate it with tools/calibrate_tau.py, or use mask='none')"
            )

    def token_loss(self, cfg, terms):
        valid, p = terms.valid, terms.p_target
        applies = valid if cfg.mask == "none" else valid & (terms.topk_mass < cfg.tau)
        mask = applies.float()
        weight = cfg.lam * mask
        penalty = weight * (p - 0.5) ** 2
        return KindLoss(
            loss=terms.ce + penalty,
            grad_scale=torch.where(valid, 1.0 - 2.0 * weight * p * (p - 0.5), 0.0),
            mask=mask,
            reports={"penalty": penalty},
        )
