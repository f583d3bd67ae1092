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
    "DEVICE_ENV", "DeviceError", "LayerImplementationError", "MegatronVersionError", "Runtime", "apply_cpu_runtime",
    "apply_cpu_training_runtime", "check_signature", "check_version", "cpu_runtime_applied", "layer_implementation",
    "missing_kernel_flags", "prepare", "prepare_megatron", "quiet_known_notices", "quiet_tool",
    "requested_transformer_impl", "select_device", "transformer_engine_available", "transformer_engine_import_error",
]

# Megatron-LM flags that a CPU run needs: gloo, weights built on the CPU, no CUDA-only fusions.
CPU_MEGATRON_FLAGS = (
    "--distributed-backend", "gloo", "--use-cpu-initialization", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
)
TRANSFORMER_IMPL_FLAG = "--transformer-impl"


class LayerImplementationError(RuntimeError):
    """The run asked for Transformer Engine layers and they cannot be imported; one line."""


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
        """Megatron-LM flags this runtime implies; they come first, so a YAML or the command line wins.
        The layer implementation is chosen separately (`layer_implementation`)."""
        return list(CPU_MEGATRON_FLAGS) if self.on_cpu else []

    def launch_env(self):
        """Environment of the ranks a tool starts itself. On the CPU, eager mode: TorchDynamo's
        compile warm-up costs more than it saves there; on a GPU Megatron's compiled fusions stay on."""
        env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
        if self.on_cpu:
            env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
        return env


def _importable(module):
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_kernel_flags(transformer_impl):
    """The --no-... flags of Megatron-LM fusions that are on by default but whose kernels this
    machine lacks (Megatron would fail at the first forward or at model build otherwise).

    - Fused RoPE comes from Transformer Engine.
    - Fused weight-gradient accumulation (an fp32-accumulating weight-gradient GEMM) comes from
      apex's `fused_weight_gradient_mlp_cuda`, with either layer implementation: GPTModel's
      output layer is Megatron's own ColumnParallelLinear even with Transformer Engine layers,
      and it refuses to build without the extension (megatron/core/tensor_parallel/layers.py).
      Off, each layer returns a 16-bit weight gradient that Megatron's DDP adds to the fp32
      main_grad (one more elementwise pass per parameter and micro-batch). The fused output-layer
      loss (--sft-fused-linear) accumulates into main_grad itself, with or without apex.
    - With the local layers, the persistent layer norm and the fused masked softmax come from
      apex's CUDA extensions too (Transformer Engine's layers bring their own).
    None of these fusions can be switched on by a flag of Megatron's (each has a --no-... flag
    only), so turning them off never overrides a user's choice."""
    flags = []
    if transformer_engine_import_error() is not None:
        flags.append("--no-rope-fusion")
    if not _importable("fused_weight_gradient_mlp_cuda"):
        flags.append("--no-gradient-accumulation-fusion")
    if transformer_impl == "local":
        if not _importable("apex"):
            flags.append("--no-persist-layer-norm")
        if not _importable("scaled_masked_softmax_cuda"):
            flags.append("--no-masked-softmax-fusion")
    return flags


_TE_IMPORT = []  # [None or the reason], filled on first use: importing Transformer Engine takes seconds


def transformer_engine_import_error():
    """None when Transformer Engine's PyTorch layers import; else why not, in one line (not
    installed, or the exception its import raised: a broken install is not an absent one)."""
    if not _TE_IMPORT:
        if not _importable("transformer_engine"):
            _TE_IMPORT.append("transformer_engine is not installed")
        else:
            try:
                import transformer_engine.pytorch  # noqa: F401
            except Exception as err:  # noqa: BLE001 - any failure of the import is the answer
                first = (str(err).strip().splitlines() or [""])[0]
                _TE_IMPORT.append(f"import transformer_engine.pytorch failed: {type(err).__name__}: {first}")
            else:
                _TE_IMPORT.append(None)
    return _TE_IMPORT[0]


def transformer_engine_available():
    """Whether Transformer Engine's PyTorch layers import (an absent or broken install: False)."""
    return transformer_engine_import_error() is None


def requested_transformer_impl(argv):
    """The --transformer-impl that argv (YAML settings spliced in, then the command line) asks
    for, the last one winning; None when it asks for none."""
    value = None
    for i, arg in enumerate(argv):
        if arg == TRANSFORMER_IMPL_FLAG and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(TRANSFORMER_IMPL_FLAG + "="):
            value = arg.split("=", 1)[1]
    return value


def layer_implementation(requested, runtime):
    """(the layer implementation, a notice or None) for a run that asked for `requested` (None: nothing).

    Never a silent fallback: a run that asks for Transformer Engine and cannot import it stops
    (LayerImplementationError naming the import error); a GPU run that asked for nothing gets
    Transformer Engine when it imports, else the local layers with a one-line notice. On the CPU
    the local layers are the only ones that run."""
    if requested not in (None, "transformer_engine"):
        return requested, None  # local (or a value Megatron's parser rejects with its choices)
    error = transformer_engine_import_error()
    if requested == "transformer_engine":
        if error is not None:
            raise LayerImplementationError(
                f"{TRANSFORMER_IMPL_FLAG} transformer_engine: Transformer Engine cannot be used ({error}); install "
                f"it (pip install '.[gpu]') or ask for {TRANSFORMER_IMPL_FLAG} local")
        return "transformer_engine", None
    if runtime.on_cpu:
        return "local", None
    if error is None:
        return "transformer_engine", None
    return "local", (f"Transformer Engine is not available ({error}): the local layers train this run "
                     f"({TRANSFORMER_IMPL_FLAG} local; their context-parallel attention keeps [s/cp, s] scores per "
                     f"head, too much at 32k tokens). {TRANSFORMER_IMPL_FLAG} transformer_engine makes this an error")


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
