"""The local spec's layer norm (torch RMSNorm or LayerNorm), usable under sequence parallelism.

Megatron's WrappedTorchNorm asserts `not config.sequence_parallel`. The norm itself works on
any slice of the sequence: under SP each TP rank normalizes its own s/tp tokens, so the weight
(and bias) gradients are partial sums over different tokens. Marking the parameters
`sequence_parallel = True` (as Megatron's TENorm and apex FusedLayerNorm do) makes
`finalize_model_grads` sum them over the tensor-parallel group before the optimizer step.
The module is the same torch module WrappedTorchNorm builds, so numerics and checkpoint
names are unchanged.
"""

import torch


class SequenceParallelNorm:
    """Builds torch.nn.RMSNorm / LayerNorm (config.normalization) with SP-marked parameters.

    Same call signature as Megatron's WrappedTorchNorm (a layer spec's `layer_norm`,
    `input_layernorm`, `pre_mlp_layernorm`, `q_layernorm`, `k_layernorm`)."""

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
                normalization="LayerNorm"):
        for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, flag, False):
                raise ValueError(f"TransformerConfig.{flag}: not supported by the local (torch) layer norm")
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps)
        else:
            raise ValueError(f"TransformerConfig.normalization: {config.normalization!r} is not RMSNorm or LayerNorm")
        for param in norm.parameters():
            # finalize_model_grads all-reduces these over TP when config.sequence_parallel.
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm
