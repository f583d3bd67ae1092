"""Model families (one folder each, registered here) and the GPTModel builder.

    from sed_megatron.models import ModelConfig, build_gpt_model, family_for

Adding a family: a folder with config.py (transformers config <-> ModelConfig), mapping.py
(the name map), spec.py (the layer spec) and an `__init__` that registers a Family, one import
below, and its tests under tests/models/.
"""

from .config import ModelConfig, padded_vocab_size
from .gpt import build_gpt_model
from .registry import Family, family_for, register, supported_model_types

# The families: importing registers them.
from . import llama, qwen2  # noqa: E402,F401  isort: skip

__all__ = ["Family", "ModelConfig", "build_gpt_model", "family_for", "padded_vocab_size", "register",
           "supported_model_types"]
