"""The adapters of one Megatron linear layer, exact under tensor, sequence and context parallelism.

    adapter = LinearAdapters.column(linear, {"q_proj": q_rows, ...}, layout, cfg, seed_key)
    adapter.attach(linear)       # a forward hook adds scaling * B (A x) to the layer's output

Each target t has A_t [r, in] and B_t [out_t, r]; delta_t = scaling * B_t A_t dropout(x).

Column-parallel layer (linear_qkv, linear_fc1; the output features are split): A is
replicated, B split by output rows as the layer's weight. u = A x is [tokens, r] on every rank:
with sequence parallelism x holds this rank's tokens, and u (r wide, not h) is all-gathered
along the sequence, whose backward reduce-scatters the partial dL/du of each rank's B rows;
dL/dA is then partial over the sequence, and A is marked `sequence_parallel` so that Megatron
sums it over TP with the layer norms'. Without sequence parallelism u enters the TP region
through Megatron's copy (backward: the all-reduce of dL/du), so dL/dA is whole on every rank.

Row-parallel layer (linear_proj, linear_fc2; the input features are split): A is split by
input columns as the layer's weight, B replicated. A x is a partial sum over TP: all-reduced
(reduce-scattered along the sequence with sequence parallelism, B then `sequence_parallel`),
as the base layer's output is, but r wide.

Context parallelism splits tokens across ranks whose weights are replicated: nothing to do
here (Megatron reduces the gradients over DP x CP). The collectives run on the linear layer's
own tp_group: Megatron's autograd mappings, and sed_megatron.parallel's sequence gather and
reduce-scatter (whose backward allocates like the forward, which the CPU layer needs). A's initialization (PEFT's: Kaiming-uniform with
a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0) draws the whole [r, in] from a generator
seeded by the layer and target, then takes this rank's columns: the same adapters whatever
the layout.
"""

import math
import zlib

import torch
from torch import nn

from sed_megatron.parallel import all_gather_sequence, group_rank_and_size, sum_scatter_sequence


def initial_lora_a(seed_key, rank, in_features, dtype=torch.float32):
    """PEFT's default A (kaiming_uniform_(a=sqrt(5)) on [rank, in] = U(-1/sqrt(in), 1/sqrt(in))), drawn
    from a generator seeded by seed_key (a string): the whole matrix, on the CPU."""
    generator = torch.Generator().manual_seed(zlib.crc32(seed_key.encode()))
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


class LowRank(nn.Module):
    """One target's lora_A [r, in(/tp)] and lora_B [out(/tp), r]."""

    def __init__(self, lora_a, lora_b):
        super().__init__()
        self.lora_A = nn.Parameter(lora_a)
        self.lora_B = nn.Parameter(lora_b)


class LinearAdapters(nn.Module):
    """The adapters of one column- or row-parallel linear layer (one LowRank per target)."""

    def __init__(self, parallel, parts, in_features, layout, cfg, seed_key, linear):
        """parallel: "column" or "row". parts: {target: output features (whole layer, TP=1)}.
        in_features: the layer's input features (TP=1). layout(deltas) -> the layer's local
        output from the per-target deltas ({target: [..., out_t/tp or out_t]})."""
        super().__init__()
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        self.parallel, self.layout = parallel, layout
        self.targets = tuple(parts)
        self.scaling, self.dropout = cfg.scaling, cfg.dropout
        self.tp_group = getattr(linear, "tp_group", None)
        self.sequence_parallel = bool(getattr(linear.config, "sequence_parallel", False))
        tp_rank, tp_size = group_rank_and_size(self.tp_group)
        weight = linear.weight
        for target, out_features in parts.items():
            lora_a = initial_lora_a(f"{cfg.init_seed}/{seed_key}/{target}", cfg.rank, in_features)
            if parallel == "row":
                lora_a = lora_a.chunk(tp_size, dim=1)[tp_rank]
                out_local = out_features
            else:
                out_local = out_features // tp_size
            module = LowRank(lora_a.to(device=weight.device, dtype=weight.dtype).contiguous(),
                             torch.zeros(out_local, cfg.rank, device=weight.device, dtype=weight.dtype))
            split, replicated = ((module.lora_B, module.lora_A) if parallel == "column"
                                 else (module.lora_A, module.lora_B))
            set_tensor_model_parallel_attributes(split, True, 0 if parallel == "column" else 1, 1)
            if self.sequence_parallel:  # partial over this rank's tokens: summed over TP with the norms'
                replicated.sequence_parallel = True
            self.add_module(target, module)

    def _low_rank_input(self, x):
        """u = A x for every target at once ([..., n r]), in the layout B multiplies."""
        from megatron.core import tensor_parallel as tp

        if self.training and self.dropout:
            if self.parallel == "row" or self.sequence_parallel:  # a rank's own features or tokens
                with tp.get_cuda_rng_tracker().fork():
                    x = nn.functional.dropout(x, self.dropout)
            else:  # the same x on every TP rank: the same mask (the default generator agrees across TP)
                x = nn.functional.dropout(x, self.dropout)
        a = torch.cat([getattr(self, t).lora_A for t in self.targets])
        u = nn.functional.linear(x, a)
        if self.parallel == "column":
            if self.sequence_parallel:
                return all_gather_sequence(u, self.tp_group)
            return tp.copy_to_tensor_model_parallel_region(u, group=self.tp_group)
        if self.sequence_parallel:
            return sum_scatter_sequence(u, self.tp_group)
        return tp.reduce_from_tensor_model_parallel_region(u, group=self.tp_group)

    def delta(self, x):
        """scaling * B A x: the layer's local output shape."""
        u = self._low_rank_input(x)
        deltas = {t: nn.functional.linear(u_t, getattr(self, t).lora_B) * self.scaling
                  for t, u_t in zip(self.targets, u.chunk(len(self.targets), dim=-1))}
        return self.layout(deltas)

    def hook(self, linear, args, kwargs, output):
        """Forward hook on the base layer: its output plus the adapters' delta (same structure)."""
        if len(output) == 3:  # Transformer Engine's layer norm + linear with its bias: (output, bias, normed input)
            out, bias, x = output
        else:
            out, bias = output
            if isinstance(out, tuple):  # Transformer Engine's layer norm + linear: (output, normed input)
                out, x = out
            else:
                x = args[0] if args else next(iter(kwargs.values()))
        return out + self.delta(x), bias  # what the layer returns without the normed input

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Each target's A and B, split along TP as the base layer's weight is (any TP loads it)."""
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        axis = {f"{t}.lora_B": 0 for t in self.targets} if self.parallel == "column" else {
            f"{t}.lora_A": 1 for t in self.targets}
        return make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets, tp_group=self.tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])
