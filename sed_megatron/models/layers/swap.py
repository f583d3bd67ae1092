"""Swap the SP/CP-capable local modules into a local layer spec, only where the run needs them."""

import dataclasses
import functools


def _replace(obj, mapping):
    """obj with every class in `mapping` replaced, through ModuleSpecs, submodule dataclasses,
    lists and partials (the shapes Megatron's layer specs take)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(obj, type):
        return mapping.get(obj, obj)
    if isinstance(obj, ModuleSpec):
        return dataclasses.replace(obj, module=_replace(obj.module, mapping),
                                   submodules=_replace(obj.submodules, mapping))
    if isinstance(obj, functools.partial):
        return functools.partial(_replace(obj.func, mapping), *[_replace(a, mapping) for a in obj.args],
                                 **{k: _replace(v, mapping) for k, v in obj.keywords.items()})
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _replace(getattr(obj, f.name), mapping)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace(item, mapping) for item in obj)
    return obj


def local_parallel_layers(spec, transformer_config):
    """The local layer spec with the torch norms made SP-capable (config.sequence_parallel) and
    the core attention made CP-capable (context_parallel_size > 1); unchanged otherwise.

    Norm parameters under SP are marked for finalize_model_grads' TP all-reduce; this covers
    the layer norms, the final norm and the Q/K norms (qk_layernorm) alike."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from .context_parallel import ContextParallelAttention
    from .norm import SequenceParallelNorm

    mapping = {}
    if transformer_config.sequence_parallel:
        mapping[WrappedTorchNorm] = SequenceParallelNorm
    if transformer_config.context_parallel_size > 1:
        mapping[DotProductAttention] = ContextParallelAttention
    return _replace(spec, mapping) if mapping else spec
