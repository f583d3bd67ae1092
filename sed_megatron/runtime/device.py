"""Which device a run computes on: the GPUs torch sees, else the CPU, and never a silent fallback.

A GPU node whose driver is broken, or whose CUDA_VISIBLE_DEVICES is empty, still lists its
GPUs in `nvidia-smi`, while torch sees none. Training there over gloo on the CPU would waste
the node, so that mismatch is an error. The two probes below are the boundary that tests fake.
"""

import os
import shutil
import subprocess

DEVICE_ENV = "SED_MEGATRON_DEVICE"
"""Set to "cpu" to run on the CPU on purpose (also on a GPU machine), or "cuda" to require GPUs."""

DEVICES = ("cuda", "cpu")


class DeviceError(RuntimeError):
    """The device this run would use is not the one the machine has; the message is one line."""


def torch_gpu_count():
    """GPUs torch can use in this process."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def driver_gpu_count():
    """GPUs `nvidia-smi -L` lists (0 without nvidia-smi); DeviceError when nvidia-smi is there but fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DeviceError(f"{exe} -L did not answer ({err}): the GPU driver is not working; fix it, or set "
                          f"{DEVICE_ENV}=cpu to run on the CPU on purpose") from None
    if out.returncode != 0:
        first = (out.stdout + out.stderr).strip().splitlines()[:1] or [f"exit {out.returncode}"]
        raise DeviceError(f"{exe} -L fails ({first[0]}): the GPU driver is not working; fix it, or set "
                          f"{DEVICE_ENV}=cpu to run on the CPU on purpose")
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def _torch_build():
    import torch

    cuda = torch.version.cuda
    return f"torch {torch.__version__} " + (f"built with CUDA {cuda}" if cuda else "built without CUDA")


def select_device(environ=None):
    """ "cuda" when torch sees a GPU, "cpu" when the machine has none; DeviceError on a mismatch."""
    environ = os.environ if environ is None else environ
    forced = environ.get(DEVICE_ENV, "")
    if forced:
        if forced not in DEVICES:
            raise DeviceError(f"{DEVICE_ENV}={forced!r}: expected one of {', '.join(DEVICES)}")
        if forced == "cuda" and torch_gpu_count() == 0:
            raise DeviceError(f"{DEVICE_ENV}=cuda but torch sees no GPU ({_torch_build()}, "
                              f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES')!r})")
        return forced
    if torch_gpu_count() > 0:
        return "cuda"
    listed = driver_gpu_count()
    if listed:
        raise DeviceError(f"nvidia-smi lists {listed} GPU(s) but torch sees none ({_torch_build()}, "
                          f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES')!r}); fix that, or set "
                          f"{DEVICE_ENV}=cpu to run on the CPU on purpose")
    return "cpu"
