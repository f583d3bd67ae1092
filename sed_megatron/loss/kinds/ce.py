"""CE: -log p_y; its gradient is the CE form, softmax(z) - onehot(y), scale 1."""

from .base import KindLoss, LossKind
from .registry import register


@register
class CrossEntropy(LossKind):
    name = "ce"

    def token_loss(self, cfg, terms):
        return KindLoss(
            loss=terms.ce.clone(),  # the loss must not alias the "ce" stat: separate outputs
            grad_scale=terms.valid.float(),
            mask=terms.ce.new_zeros(terms.ce.shape),
            reports={},
        )
