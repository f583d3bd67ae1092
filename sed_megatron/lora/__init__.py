"""Low-rank adapters (LoRA) on Megatron-Core's linear layers: training, checkpoints and the PEFT export.

    from sed_megatron.lora import LoRAConfig, apply_lora
    apply_lora(model, LoRAConfig(rank=16, alpha=32, target_modules="all-linear"))

config.py: the settings and PEFT's target names; layers.py: one linear layer's adapters and
their tensor-parallel math; model.py: adapters on a GPTModel, the rest frozen; peft.py: the
adapters as PEFT stores them, and merged into the base weights.
"""

from .config import ALL_LINEAR, LORA_FILE, PEFT_TARGETS, LoRAConfig, parse_targets, read_lora_file, write_lora_file
from .model import adapter_parameter_count, apply_lora, set_checkpoint_parts

__all__ = ["ALL_LINEAR", "LORA_FILE", "PEFT_TARGETS", "LoRAConfig", "adapter_parameter_count", "apply_lora",
           "parse_targets", "read_lora_file", "set_checkpoint_parts", "write_lora_file"]
