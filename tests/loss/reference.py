"""Single-process float64 reference of the loss family, written from the published formulas.

    CE   = -log p_y
    DFT  = sg(p_y) * CE
    SED  = CE + lam * M * (p_y - 0.5)^2,  M = [P_topk < tau] (no gradient), or 1 for mask="none"
    GEM  = -sum_j q_j (log p_y - log p_j),  q = sg(softmax(z / beta))      (h = "linear")

It materializes the full softmax and lets autograd differentiate, as the published code does;
nothing here shares code with sed_megatron.loss.
"""

import torch

IGNORE = -100


def reference_loss(logits, target, kind, top_k=2, tau=None, lam=1.0, mask="topk_mass", gem_beta=0.7):
    """logits [s, b, V] float64 (requires grad as the caller wishes), target [s, b] -> (loss, stats)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    valid = target != IGNORE
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    log_p_target = log_probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    ce = -log_p_target
    p_target = log_p_target.exp()
    topk_mass = probs.topk(top_k, dim=-1).values.sum(-1).detach()
    if kind == "ce":
        loss = ce
        penalty_mask = torch.zeros_like(ce)
    elif kind == "dft":
        loss = p_target.detach() * ce
        penalty_mask = torch.zeros_like(ce)
    elif kind == "sed":
        penalty_mask = torch.ones_like(ce) if mask == "none" else (topk_mass < tau).double()
        loss = ce + lam * penalty_mask * (p_target - 0.5) ** 2
    elif kind == "gem":
        q = torch.softmax(logits.detach() / gem_beta, dim=-1)
        loss = -(q * (log_p_target.unsqueeze(-1) - log_probs)).sum(-1)
        penalty_mask = torch.zeros_like(ce)
    else:
        raise ValueError(kind)
    zero = torch.zeros_like(ce)
    stats = {
        "ce": torch.where(valid, ce, zero).detach(),
        "p_target": torch.where(valid, p_target, zero).detach(),
        "topk_mass": topk_mass,
        "mask": torch.where(valid, penalty_mask, zero).detach(),
        "entropy": -(probs * log_probs).sum(-1).detach(),
        # The target's logit is the largest (ties count: argmax would pick one of them).
        "correct": (valid & (logits.gather(-1, safe_target[..., None])[..., 0] == logits.amax(-1))).double().detach(),
    }
    return torch.where(valid, loss, zero), stats
