"""Where a run computes, and what Megatron-Core needs there. Entry points call `prepare()` first.

    runtime = prepare(training=True)   # GPU: NCCL, untouched torch; no GPU: the CPU layer, gloo

Every machine gets the megatron-core version check and the prebuilt dataset helpers
(`mcore.py`). The CPU layer (`cpu.py`) is applied only when the device check (`device.py`)
finds no GPU at all; a GPU that the driver lists and torch cannot see is an error, never a
silent fallback to the CPU.
"""

from dataclasses import dataclass

from .cpu import apply_cpu_runtime, apply_cpu_training_runtime, cpu_runtime_applied
from .device import DEVICE_ENV, DeviceError, select_device
from .mcore import MegatronVersionError, check_signature, check_version, prepare_megatron

__all__ = [
    "DEVICE_ENV", "DeviceError", "MegatronVersionError", "Runtime", "apply_cpu_runtime",
    "apply_cpu_training_runtime", "check_signature", "check_version", "cpu_runtime_applied", "prepare",
    "missing_kernel_flags", "prepare_megatron", "quiet_known_notices", "quiet_tool",
    "select_device", "transformer_engine_available",
]

# Megatron-LM flags that a CPU run needs: gloo, weights built on the CPU, no CUDA-only fusions.
CPU_MEGATRON_FLAGS = (
    "--distributed-backend", "gloo", "--use-cpu-initialization", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
)


@dataclass(frozen=True)
class Runtime:
    device: str
    """"cuda" or "cpu"."""

    @property
    def on_cpu(self):
        return self.device == "cpu"

    @property
    def backend(self):
        return "gloo" if self.on_cpu else "nccl"

    def megatron_flags(self):
        """Megatron-LM flags this runtime implies; they come first, so a YAML or the command line wins."""
        flags = list(CPU_MEGATRON_FLAGS) if self.on_cpu else []
        if self.on_cpu or not transformer_engine_available():
            flags += ["--transformer-impl", "local"]
        return flags


def _importable(module):
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_kernel_flags(transformer_impl):
    """The --no-... flags of Megatron-LM fusions that are on by default but whose kernels this
    machine lacks (Megatron would fail at the first forward or at model build otherwise).

    Fused RoPE comes from Transformer Engine; with the local layers, fused weight-gradient
    accumulation, the persistent layer norm and the fused masked softmax come from apex's CUDA
    extensions. None of these fusions can be switched on by a flag, so turning them off never
    overrides a user's choice."""
    flags = []
    if not transformer_engine_available():
        flags.append("--no-rope-fusion")
    if transformer_impl == "local":
        if not _importable("fused_weight_gradient_mlp_cuda"):
            flags.append("--no-gradient-accumulation-fusion")
        if not _importable("apex"):
            flags.append("--no-persist-layer-norm")
        if not _importable("scaled_masked_softmax_cuda"):
            flags.append("--no-masked-softmax-fusion")
    return flags


def transformer_engine_available():
    """Whether Transformer Engine's PyTorch layers import (an absent or broken install: False)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def quiet_known_notices():
    """Megatron's import-time warnings that Transformer Engine or apex are absent (one per module,
    a dozen in all) and torch's CUDA_HOME notice: prepare() reports what matters of them once."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|transformer-engine)\b.*", category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def quiet_tool():
    """A tool whose output is one result: no Python warnings, transformers' bars or Megatron's
    info and warning logs (its --verbose keeps them)."""
    import logging
    import warnings

    quiet_known_notices()
    warnings.simplefilter("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


def prepare(training=True, environ=None, verbose=False):
    """Select the device (DeviceError on a mismatch), adjust Megatron for it; returns the Runtime.

    training=True also adjusts Megatron-LM's training loop (megatron.training) on the CPU.
    verbose=False hides Megatron's import-time notices about absent optional kernels."""
    if not verbose:
        quiet_known_notices()
    runtime = Runtime(select_device(environ))
    prepare_megatron()
    if runtime.on_cpu:
        (apply_cpu_training_runtime if training else apply_cpu_runtime)()
    return runtime
