"""Single-process float64 reference of the loss family, written from the published formulas.

One function per loss kind, in REFERENCE_KINDS (a new kind adds one here):

    CE   = -log p_y
    DFT  = sg(p_y) * CE
    SED  = CE + lam * M * (p_y - 0.5)^2,  M = [P_topk < tau] (no gradient), or 1 for mask="none"
    GEM  = -sum_j q_j w_j (log p_y - log p_j),  q = sg(softmax(z / beta)),
           w_j = 1 (h = "linear") or sg(sigmoid(0.01 (z_j - z_y))) (h = "logsigmoid"; GEM's gem_loss)

It materializes the full softmax and lets autograd differentiate, as the published code does;
nothing here shares code with sed_megatron.loss.
"""

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Tokens:
    """What a kind's reference reads: logits [s, b, V] and per-token [s, b] tensors (with grad)."""

    logits: torch.Tensor
    target: torch.Tensor  # [s, b], ignored positions set to id 0
    log_probs: torch.Tensor  # [s, b, V]
    log_p_target: torch.Tensor
    topk_mass: torch.Tensor  # detached


def ce_reference(tokens, **hyper):
    """-> (loss, penalty mask, reports) per token."""
    return -tokens.log_p_target, torch.zeros_like(tokens.log_p_target), {}


def dft_reference(tokens, **hyper):
    ce = -tokens.log_p_target
    return tokens.log_p_target.exp().detach() * ce, torch.zeros_like(ce), {}


def sed_reference(tokens, tau=None, lam=1.0, mask="topk_mass", **hyper):
    ce = -tokens.log_p_target
    p_target = tokens.log_p_target.exp()
    penalty_mask = torch.ones_like(ce) if mask == "none" else (tokens.topk_mass < tau).double()
    penalty = lam * penalty_mask * (p_target - 0.5) ** 2
    return ce + penalty, penalty_mask, {"penalty": penalty}


def gem_reference(tokens, gem_beta=0.7, gem_h="linear", **hyper):
    logits = tokens.logits.detach()
    q = torch.softmax(logits / gem_beta, dim=-1)
    if gem_h == "linear":
        weights = torch.ones_like(q)
    else:
        target_logit = logits.gather(-1, tokens.target.unsqueeze(-1))
        weights = torch.sigmoid(0.01 * (logits - target_logit))
    loss = -(q * weights * (tokens.log_p_target.unsqueeze(-1) - tokens.log_probs)).sum(-1)
    return loss, torch.zeros_like(loss), {}


REFERENCE_KINDS = {"ce": ce_reference, "dft": dft_reference, "sed": sed_reference, "gem": gem_reference}


def reference_loss(logits, target, kind, top_k=2, **hyper):
    """logits [s, b, V] float64 (requires grad as the caller wishes), target [s, b] -> (loss, stats).

    hyper: the kind's LossConfig fields (tau, lam, mask, gem_beta, gem_h).
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    valid = target != IGNORE
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    log_p_target = log_probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    topk_mass = probs.topk(top_k, dim=-1).values.sum(-1).detach()
    tokens = Tokens(logits=logits, target=safe_target, log_probs=log_probs, log_p_target=log_p_target,
                    topk_mass=topk_mass)
    loss, penalty_mask, reports = REFERENCE_KINDS[kind](tokens, **hyper)
    zero = torch.zeros_like(loss)
    stats = {
        "ce": torch.where(valid, -log_p_target, zero).detach(),
        "p_target": torch.where(valid, log_p_target.exp(), zero).detach(),
        "topk_mass": topk_mass,
        "mask": torch.where(valid, penalty_mask, zero).detach(),
        "entropy": -(probs * log_probs).sum(-1).detach(),
        # The target's logit is the largest (ties count: argmax would pick one of them).
        "correct": (valid & (logits.gather(-1, safe_target[..., None])[..., 0] == logits.amax(-1))).double().detach(),
    }
    stats.update({name: torch.where(valid, value, zero).detach() for name, value in reports.items()})
    return torch.where(valid, loss, zero), stats
