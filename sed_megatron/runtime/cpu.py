"""The CPU layer: Megatron-Core on a machine without a GPU (tests, the CPU quickstart), over gloo.

Megatron-Core hard-codes CUDA devices, CUDA RNG states and CUDA type strings in many places.
`apply_cpu_runtime()` adjusts those process-wide. It is an explicit choice: entry points take
it through `sed_megatron.runtime.prepare()` when no GPU is visible (and the device check has
ruled out a GPU that torch cannot see), tests take it for their gloo workers. Importing this
module changes nothing; on a GPU run it is never applied, so production keeps NCCL, CUDA RNG
and fused kernels.
"""

import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_applied = False
_training_applied = False

_CPU = torch.device("cpu")


def _is_cuda_device(device):
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare index means a CUDA device in torch factories
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cuda_type_name(cpu_type_name):
    """'torch.FloatTensor' -> 'torch.cuda.FloatTensor', as a tensor on a GPU would report."""
    return cpu_type_name.replace("torch.", "torch.cuda.", 1)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU in every torch call made while it is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:  # .cuda() of a CPU tensor: stay on the CPU
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):  # page-locked memory needs a CUDA driver (RoPE's CP slice asks for it)
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Optimizer and grad-clipping code compare type strings with 'torch.cuda.FloatTensor'.
            return _cuda_type_name(result)
        return result


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def record_event(self, event=None):
        # The MoE alltoall dispatcher records an event on its device-to-host stream and waits on it.
        return _NoOpStream()

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _RngWarningFilter(logging.Filter):
    # With CUDA RNG redirected to the CPU generator, Megatron's fork() sees that generator move.
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_torch_cuda():
    cuda = torch.cuda
    # The "current device" is index 0, which the device mode maps to the CPU.
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    # megatron.training skips model-parallel init and RNG seeding when no device is counted.
    cuda.device_count = lambda: 1
    # No streams or events on the CPU; ordering is program order.
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda device=None: _NoOpStream()
    cuda.default_stream = lambda device=None: _NoOpStream()
    cuda.stream = lambda stream=None: _NoOpStream()
    cuda.empty_cache = lambda: None
    # CUDA RNG state -> the CPU generator, so Megatron's RNG tracker keeps per-rank streams.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it after seeding the CPU
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    # Memory statistics used in logging: report zero instead of raising.
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.max_memory_reserved = lambda device=None: 0


def _patch_megatron_rng():
    from megatron.core.tensor_parallel import random as mcore_random

    # These bypass torch.cuda's public RNG functions through the CUDA default generators.
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(mcore_random.__name__).addFilter(_RngWarningFilter())


def _patch_megatron_moe():
    """The MoE alltoall token dispatcher over gloo."""
    from megatron.core.transformer.moe import token_dispatcher

    move_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Megatron makes the split sizes numpy only when it moves them off a GPU; on the CPU they
        # would stay tensors, which all_to_all_single does not take as split sizes.
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return move_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_megatron_mappings():
    """Megatron's communication mappings allocate on "cuda" in their backward too, where the
    device mode is not active (torch runs an autograd Function's backward without the
    forward's modes): each backward runs under the mode (a frozen linear's sequence gather)."""
    import functools

    from megatron.core.tensor_parallel import mappings

    def under_mode(backward):
        @functools.wraps(backward)
        def run(*args, **kwargs):
            with _CudaToCpuMode():
                return backward(*args, **kwargs)

        return staticmethod(run)

    for value in list(vars(mappings).values()):
        if isinstance(value, type) and issubclass(value, torch.autograd.Function) and "backward" in vars(value):
            value.backward = under_mode(vars(value)["backward"].__func__)


def _patch_megatron_training():
    """megatron.training (Megatron-LM's loop) asserts or queries CUDA in a few more places."""
    import functools

    import megatron.training.arguments as training_arguments
    import megatron.training.training as training_loop

    # validate_args asks the GPU architecture when TP > 1; answer Hopper, whose rules
    # (CUDA_DEVICE_MAX_CONNECTIONS=1) are the ones that also suit gloo.
    training_arguments.get_device_arch_version = lambda: 9
    # pretrain() calls initialize_megatron() without allow_no_cuda, which asserts CUDA.
    training_loop.initialize_megatron = functools.partial(training_loop.initialize_megatron, allow_no_cuda=True)
    # The fusion warm-up draws random numbers between seeding and model init; on CPU they come
    # from the generator the CPU initialization uses, so shield it to keep the weights reproducible.
    warmup = training_loop.set_jit_fusion_options

    def set_jit_fusion_options(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return warmup(*args, **kwargs)

    training_loop.set_jit_fusion_options = set_jit_fusion_options


def apply_cpu_runtime():
    """Make Megatron-Core run on the CPU, process-wide; idempotent."""
    global _applied
    if _applied:
        return
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_megatron_moe()
    _patch_megatron_mappings()
    # Entered for the life of the process: Megatron allocates on "cuda" at import, init and step.
    _CudaToCpuMode().__enter__()
    _applied = True
    logger.debug("no GPU: Megatron-Core runs on the CPU layer over gloo")


def apply_cpu_training_runtime():
    """apply_cpu_runtime() plus what Megatron-LM's training loop needs; idempotent."""
    global _training_applied
    apply_cpu_runtime()
    if not _training_applied:
        _patch_megatron_training()
        _training_applied = True


def cpu_runtime_applied():
    return _applied
