"""Local (non Transformer Engine) layers that Megatron-Core's local spec lacks for SP and CP.

- `SequenceParallelNorm`: the local spec's torch RMSNorm / LayerNorm, allowed under sequence
  parallelism, its weights marked for the TP all-reduce of sequence-parallel parameters.
- `ContextParallelAttention`: the local spec's core attention under context parallelism: K and
  V all-gathered over the CP group, the causal mask built from global token positions (and
  packed sample boundaries), a reduce-scatter in the backward.

`local_parallel_layers(spec, transformer_config)` swaps them into a local layer spec where the
configuration needs them (models/gpt.py calls it); with Transformer Engine, Megatron's own TE
modules do both.
"""

from .context_parallel import ContextParallelAttention, cp_partition_indices, cp_token_layout
from .norm import SequenceParallelNorm
from .swap import local_parallel_layers

__all__ = ["ContextParallelAttention", "SequenceParallelNorm", "cp_partition_indices",
           "cp_token_layout", "local_parallel_layers"]
