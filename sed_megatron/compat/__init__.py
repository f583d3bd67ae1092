"""Runtime adjustments that let Megatron-Core run where it otherwise would not (CPU-only)."""

from .cpu import apply_cpu_runtime, apply_cpu_training_runtime, cpu_runtime_applied

__all__ = ["apply_cpu_runtime", "apply_cpu_training_runtime", "cpu_runtime_applied"]
