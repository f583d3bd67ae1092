"""Process-group helpers every layer uses: a rank's place in a group, a model's groups, and the
sequence all-gather with its reduce-scatter (sequence and context parallelism).

Groups travel explicitly (a `tp_group`, a model's `pg_collection`); nothing here looks up
Megatron's global parallel state. A group of None is this process alone.
"""

import torch
import torch.distributed as dist

_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_rank_and_size(group):
    """(rank, size) of this process in `group`; (0, 1) when it is None."""
    if group is None:
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def pipeline_stage(pp_group):
    """(first stage, last stage) of this rank in its pipeline group (virtual stages ignored)."""
    rank, size = group_rank_and_size(pp_group)
    return rank == 0, rank == size - 1


def model_groups(model):
    """The ProcessGroupCollection (tp, pp, dp, cp, ...) a Megatron model chunk was built with."""
    from megatron.core.utils import get_attr_wrapped_model

    return get_attr_wrapped_model(model, "pg_collection")


def gather_sequence(tensor, group):
    """`[s, ...]` on each rank -> `[size * s, ...]`, rank order along dim 0 (the sequence)."""
    _, size = group_rank_and_size(group)
    total = tensor.new_empty((size * tensor.size(0), *tensor.shape[1:]))
    _all_gather_into(total, tensor.contiguous(), group=group)
    return total


def reduce_scatter_sequence(tensor, group):
    """`[s, ...]` on each rank -> this rank's `[s / size, ...]` of the sum over the ranks."""
    _, size = group_rank_and_size(group)
    local = tensor.new_empty((tensor.size(0) // size, *tensor.shape[1:]))
    _reduce_scatter_into(local, tensor.contiguous(), group=group)
    return local


class _AllGatherSequence(torch.autograd.Function):
    """gather_sequence whose backward reduce-scatters the gradient (every rank used this rank's part)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return gather_sequence(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_sequence(grad, ctx.group), None


def all_gather_sequence(tensor, group):
    """gather_sequence under autograd (the gradient is reduce-scattered); the tensor itself for a group of one."""
    if group is None or dist.get_world_size(group=group) == 1:
        return tensor
    return _AllGatherSequence.apply(tensor, group)


class _ReduceScatterSequence(torch.autograd.Function):
    """reduce_scatter_sequence whose backward all-gathers the gradient (each rank's part of the sum)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return reduce_scatter_sequence(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_sequence(grad, ctx.group), None


def sum_scatter_sequence(tensor, group):
    """reduce_scatter_sequence under autograd (the gradient is all-gathered); the tensor itself for a group of one."""
    if group is None or dist.get_world_size(group=group) == 1:
        return tensor
    return _ReduceScatterSequence.apply(tensor, group)
