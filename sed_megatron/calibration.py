"""τ calibration: the (1 - r) quantile of the top-k mass that the initial model assigns.

SED-SFT penalizes a token when its top-k probability mass P_topk is below τ, and sets τ so
that a share r (the masking ratio) of tokens is left without the penalty:

    tau = sorted(P_topk)[N - floor(r N)]      (ascending, N values; the published rule)

so about (1 - r) N tokens have P_topk < tau. floor(r N) = 0 (r N < 1) gives, as the published
`sorted(values)[-0]` does, the smallest value: no token lies below it, none is penalized. The values are gathered from every data-parallel rank
before the quantile is taken, so τ does not depend on the parallel layout.
"""

import math

import torch
import torch.distributed as dist

TOKEN_SETS = ("response", "all")


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
    """The top-k masses of the calibrated positions: response tokens, or every non-padding one."""
    from sed_megatron.loss import IGNORE_INDEX

    if token_set == "response":
        return topk_mass[loss_mask.bool()]
    if token_set == "all":
        return topk_mass[labels != IGNORE_INDEX]
    raise ValueError(f"unknown token set {token_set!r}; expected one of {TOKEN_SETS}")
