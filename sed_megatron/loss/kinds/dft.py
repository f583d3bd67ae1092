"""DFT (Wu et al. 2025): sg(p_y) * CE; gradient p_y (softmax(z) - onehot(y)), the CE form scaled by p_y."""

from .base import KindLoss, LossKind
from .registry import register


@register
class DynamicFineTuning(LossKind):
    name = "dft"

    def token_loss(self, cfg, terms):
        return KindLoss(
            loss=terms.p_target * terms.ce,
            grad_scale=terms.p_target,
            mask=terms.ce.new_zeros(terms.ce.shape),
            reports={},
        )
