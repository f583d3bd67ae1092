"""τ calibration: the (1 - r) quantile of the top-k mass that the initial model assigns.

SED-SFT penalizes a token when its top-k probability mass P_topk is below τ, and sets τ so
that a share r (the masking ratio) of tokens is left without the penalty:

    tau = sorted(P_topk)[N - floor(r N)]      (ascending, N values; the published rule)

so about (1 - r) N tokens have P_topk < tau. floor(r N) = 0 (r N < 1) gives, as the published
`sorted(values)[-0]` does, the smallest value: no token lies below it, none is penalized. The
values are gathered from every data- and context-parallel rank before the quantile is taken,
so τ does not depend on the parallel layout.

Token sets: `response` (the loss tokens; the default), `all` (every position that has a
target, prompt included), and `published`, the published code's calibration: every position
of the sample's full ids, prompt included and the last id too (whose prediction lies past the
end), with k = 10 unless given (the published code calibrates with k = 10 and trains with
k = 2). Its rows come from `with_full_input()` datasets (see data/simple.py sample_from_tokens),
whose positions past the end carry a target without loss, so `all` and `published` select the
same way; what differs is the rows.
"""

import math

import torch
import torch.distributed as dist

TOKEN_SETS = ("response", "all", "published")
PUBLISHED_TOP_K = 10
"""The k the published code calibrates with (its --top_k default for the calibration)."""


def calibration_top_k(token_set, train_top_k, top_k=None):
    """k of the top-k mass that calibrates tau: top_k if given, else 10 for the published token
    set (as the published code), else the training k (one k for both, the consistent choice)."""
    if top_k is not None:
        return top_k
    return PUBLISHED_TOP_K if token_set == "published" else train_top_k


def tau_from_topk_mass(values, mask_ratio):
    """The published quantile rule over a 1-D tensor of top-k masses."""
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {mask_ratio}")
    values = values.detach().flatten().double()
    if values.numel() == 0:
        raise ValueError("no tokens to calibrate tau on (empty calibration set or no response tokens)")
    unpenalized = math.floor(mask_ratio * values.numel())
    # Python's [-0] is [0]: with floor(r N) = 0 the published rule returns the smallest value.
    return float(torch.sort(values).values[(values.numel() - unpenalized) % values.numel()])


def gather_values(values, group):
    """Every rank's 1-D tensor of values, concatenated in rank order (all ranks get all)."""
    if group is None or dist.get_world_size(group=group) == 1:
        return values
    size = torch.tensor([values.numel()], dtype=torch.int64, device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(sizes))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([part[: int(n)] for part, n in zip(gathered, sizes)])


def select_tokens(topk_mass, labels, loss_mask, token_set):
    """The top-k masses of the calibrated positions: response tokens, or every non-padding one
    (`all`; `published` too, on rows whose every id is an input: see the module docstring)."""
    from .config import IGNORE_INDEX

    if token_set == "response":
        return topk_mass[loss_mask.bool()]
    if token_set in ("all", "published"):
        return topk_mass[labels != IGNORE_INDEX]
    raise ValueError(f"unknown token set {token_set!r}; expected one of {TOKEN_SETS}")
