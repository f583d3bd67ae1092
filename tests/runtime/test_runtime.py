"""sed_megatron.runtime: device selection, the every-machine Megatron adjustments, the CPU layer's scope.

The GPU checks are faked at their boundary (runtime.device.torch_gpu_count, a fake `nvidia-smi`
on PATH). Start-up paths run in fresh processes, since the CPU layer patches process-wide.
"""

import os
import stat
import subprocess
import sys

import pytest

from sed_megatron.runtime import DeviceError, MegatronVersionError, check_signature, check_version, select_device
from sed_megatron.runtime import device as device_module

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(code, env=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=300)


def fake_nvidia_smi(directory, output="GPU 0: NVIDIA H200 (UUID: GPU-0)\nGPU 1: NVIDIA H200 (UUID: GPU-1)\n", code=0):
    """An `nvidia-smi` that prints output and exits with code; returns a PATH that finds it first."""
    path = os.path.join(directory, "nvidia-smi")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\ncat <<'EOF'\n{output}EOF\nexit {code}\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return f"{directory}{os.pathsep}{os.environ['PATH']}"


GPU_PRESENT = """
import subprocess, torch
import sed_megatron.runtime.device as device
device.torch_gpu_count = lambda: 1            # the boundary: torch sees a GPU
calls = []
real_run = subprocess.run
subprocess.run = lambda cmd, *a, **k: calls.append(cmd) or real_run(cmd, *a, **k)
before = (torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.synchronize, torch.cuda.device_count)
import megatron.training.training as loop
initialize_before = loop.initialize_megatron
from sed_megatron.runtime import cpu_runtime_applied, prepare
runtime = prepare(training=True)
assert runtime.device == "cuda" and runtime.backend == "nccl", runtime
assert not cpu_runtime_applied()
assert before == (torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.synchronize, torch.cuda.device_count)
assert torch.overrides._get_current_function_mode_stack() == []
assert loop.initialize_megatron is initialize_before    # allow_no_cuda is not forced
assert "--distributed-backend" not in runtime.megatron_flags()
from megatron.core.datasets.utils import compile_helpers
compile_helpers()                                      # what Megatron's initialize calls on rank 0
assert not any("make" in str(c) for c in calls), calls
print("gpu path ok")
"""


def test_gpu_startup_does_not_run_make_or_apply_the_cpu_layer():
    out = run_python(GPU_PRESENT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gpu path ok"


CPU_ONLY = """
import subprocess, torch
calls = []
real_run = subprocess.run
subprocess.run = lambda cmd, *a, **k: calls.append(cmd) or real_run(cmd, *a, **k)
from sed_megatron.runtime import cpu_runtime_applied, prepare
assert torch.overrides._get_current_function_mode_stack() == []   # importing changes nothing
runtime = prepare(training=True)
assert runtime.device == "cpu" and runtime.backend == "gloo" and cpu_runtime_applied()
assert torch.zeros(2, device="cuda").device.type == "cpu"
from megatron.core.datasets.utils import compile_helpers
compile_helpers()
assert not any("make" in str(c) for c in calls), calls
print("cpu path ok")
"""


@pytest.mark.skipif(device_module.torch_gpu_count() > 0, reason="a machine without GPUs")
def test_cpu_startup_applies_the_cpu_layer_without_make():
    # No nvidia-smi on PATH: a machine without GPUs.
    out = run_python(CPU_ONLY, env={"PATH": os.path.dirname(sys.executable), device_module.DEVICE_ENV: ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cpu path ok"


def test_gpus_listed_but_invisible_to_torch_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(device_module, "torch_gpu_count", lambda: 0)
    monkeypatch.setenv("PATH", fake_nvidia_smi(str(tmp_path)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError, match=r"nvidia-smi lists 2 GPU\(s\) but torch sees none") as err:
        select_device(environ={"CUDA_VISIBLE_DEVICES": ""})
    assert "\n" not in str(err.value) and "SED_MEGATRON_DEVICE=cpu" in str(err.value)
    # On purpose: the CPU is used when asked for.
    assert select_device(environ={device_module.DEVICE_ENV: "cpu"}) == "cpu"


def test_broken_driver_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(device_module, "torch_gpu_count", lambda: 0)
    monkeypatch.setenv("PATH", fake_nvidia_smi(str(tmp_path), output="NVIDIA-SMI has failed because it couldn't "
                                               "communicate with the NVIDIA driver.\n", code=9))
    with pytest.raises(DeviceError, match="NVIDIA-SMI has failed") as err:
        select_device(environ={})
    assert "\n" not in str(err.value)


def test_device_override(monkeypatch):
    monkeypatch.setattr(device_module, "torch_gpu_count", lambda: 0)
    monkeypatch.setattr(device_module, "driver_gpu_count", lambda: 0)
    assert select_device(environ={}) == "cpu"
    with pytest.raises(DeviceError, match="SED_MEGATRON_DEVICE=cuda but torch sees no GPU"):
        select_device(environ={device_module.DEVICE_ENV: "cuda"})
    with pytest.raises(DeviceError, match="expected one of cuda, cpu"):
        select_device(environ={device_module.DEVICE_ENV: "tpu"})
    monkeypatch.setattr(device_module, "torch_gpu_count", lambda: 8)
    assert select_device(environ={}) == "cuda"


def test_training_entry_point_stops_on_invisible_gpus(tmp_path):
    """The whole start-up path: one line, exit 2, before Megatron starts."""
    env = {**os.environ, "PATH": fake_nvidia_smi(str(tmp_path)), "CUDA_VISIBLE_DEVICES": ""}
    env.pop(device_module.DEVICE_ENV, None)
    out = subprocess.run([sys.executable, "-m", "sed_megatron.train", "--config", "examples/tiny_cpu.yaml"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sed_megatron.train: error: nvidia-smi lists 2 GPU(s)"), out.stderr


def test_megatron_version_range():
    assert check_version("0.19.2") == "0.19.2"
    assert check_version("0.19.5rc1") == "0.19.5rc1"
    for bad in ("0.19.1", "0.20.0", "1.0.0"):
        with pytest.raises(MegatronVersionError, match=rf"megatron-core {bad} is installed; .*>=0\.19\.2,<0\.20"):
            check_version(bad)
    check_version()  # the installed one


def test_hook_signature_check():
    def training_log(loss_dict, total_loss_dict, learning_rate):
        pass

    check_signature(training_log, ("loss_dict", "total_loss_dict"), "the metrics hook")
    with pytest.raises(MegatronVersionError, match=r"does not take \(loss_dict, iteration\), which the metrics"):
        check_signature(training_log, ("loss_dict", "iteration"), "the metrics hook")
    with pytest.raises(MegatronVersionError, match=r"does not take \(loss_dict, is_first_iteration=\)"):
        check_signature(training_log, ("loss_dict",), "the metrics hook", keywords=("is_first_iteration",))


def test_hooks_match_the_installed_megatron():
    import megatron.training.training as loop

    from sed_megatron.training.hooks import TRAIN_PARAMS, TRAINING_LOG_PARAMS

    check_signature(loop.train, TRAIN_PARAMS, "train")
    check_signature(loop.training_log, TRAINING_LOG_PARAMS, "training_log", keywords=("is_first_iteration",))


GPU_WITHOUT_KERNELS = """
from sed_megatron.runtime import Runtime, missing_kernel_flags
from sed_megatron.training.setup import parse_run_args
assert missing_kernel_flags("transformer_engine") == ["--no-rope-fusion"]
args, _ = parse_run_args(["--config", "examples/tiny_cpu.yaml", "--tensor-model-parallel-size", "1"], Runtime("cuda"))
assert args.distributed_backend == "nccl" and not args.use_cpu_initialization and args.transformer_impl == "local"
assert not (args.gradient_accumulation_fusion or args.apply_rope_fusion or args.masked_softmax_fusion)
assert args.no_persist_layer_norm
print("ok")
"""


def test_gpu_run_without_te_or_apex_turns_off_the_fusions_it_lacks():
    """Megatron's defaults fuse RoPE, weight-gradient accumulation, the layer norm and the masked
    softmax; without Transformer Engine and apex the local layers would fail at build or first step."""
    out = run_python(GPU_WITHOUT_KERNELS, env={"RANK": "0", "WORLD_SIZE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
    assert "kernels for these Megatron fusions are not installed" in out.stdout
