"""Reduction of per-token losses: loss mask, then one division by the global token count."""

import torch
import torch.distributed as dist


def masked_sum_and_count(values, loss_mask):
    """sum(values * loss_mask) and sum(loss_mask), two fp32 scalars (values `[s, b]`).

    Separate tensors, not views of one: Megatron's pipeline schedule frees the loss tensor's
    storage and refuses a view.
    """
    loss_mask = loss_mask.to(torch.float32)
    return (values.float() * loss_mask).sum(), loss_mask.sum()


def masked_token_mean(values, loss_mask, group=None):
    """This rank's share of the token mean over every rank of `group` (None: this process alone).

    Returns sum(values * loss_mask) / (count of loss tokens on all ranks of the group): summing
    the shares over the group (as a data-parallel gradient all-reduce does) gives the global
    token mean, so every token weighs the same whatever rank holds it. One all-reduce of one
    number. No valid token anywhere gives 0, never NaN. Differentiable in values.
    """
    total, count = masked_sum_and_count(values, loss_mask)
    if group is not None and dist.get_world_size(group=group) > 1:
        count = count.detach().clone()
        dist.all_reduce(count, group=group)
    return total / count.clamp(min=1.0)
