"""Model families by Hugging Face model_type: one registration per family folder.

    from sed_megatron.models import family_for
    family = family_for(hf_config.model_type)       # ValueError listing the supported types
    cfg = family.config_from_hf(hf_config)          # typed ModelConfig
    rows = family.rows(cfg)                         # the concrete name map of that model

Families register when `sed_megatron.models` is imported (explicit imports in its
`__init__`). A family is a folder with its architecture map (config.py), its name map
(mapping.py) and its layer spec (spec.py); a variant overrides only what differs from its
parent (`dataclasses.replace(LLAMA, ...)`). Shared code never branches on a model_type.
"""

from collections.abc import Callable
from dataclasses import dataclass

from .mapping import expand


@dataclass(frozen=True)
class Family:
    """Everything the converters, the model builder and the tests need to know of one family."""

    name: str
    """Short name (its folder under sed_megatron/models/ for a family of its own)."""
    model_types: tuple
    """Hugging Face config.json model_type values it reads and writes."""
    architecture: str
    """The transformers *ForCausalLM class, written into an exported config.json's `architectures`
    (vLLM and SGLang choose their model class by it)."""
    config_from_hf: Callable
    """config_from_hf(transformers config) -> ModelConfig; ValueError naming the field it cannot express."""
    hf_config: Callable
    """hf_config(ModelConfig, **extra) -> transformers config (the inverse; extra: e.g. dtype)."""
    mappings: Callable
    """mappings(ModelConfig) -> [Mapping]: the name map, both directions (see mapping.py)."""
    block_spec: Callable
    """block_spec(ModelConfig, TransformerConfig, vp_stage, pp_rank) -> the decoder block's layer specs
    of one pipeline stage (Megatron's TransformerBlockSubmodules)."""

    def rows(self, cfg):
        """The concrete name map of a model: global tensors, then every layer's."""
        return expand(self.mappings(cfg), cfg.num_layers)


_FAMILIES = {}  # model_type -> Family


def register(family):
    """Make `family` the converter of each of its model_types; returns it (for module-level use)."""
    for model_type in family.model_types:
        known = _FAMILIES.get(model_type)
        if known is not None and known is not family:
            raise ValueError(f"model_type {model_type!r} is already registered by family {known.name!r}")
        _FAMILIES[model_type] = family
    return family


def supported_model_types():
    return tuple(sorted(_FAMILIES))


def family_for(model_type):
    """The family registered for a Hugging Face model_type; ValueError listing the supported ones."""
    family = _FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}")
    return family
