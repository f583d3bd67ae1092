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
from sed_megatron.training.parse import parse_run_args
assert missing_kernel_flags("transformer_engine") == ["--no-rope-fusion", "--no-gradient-accumulation-fusion"]
args, _ = parse_run_args(["--config", "examples/tiny_cpu.yaml", "--tensor-model-parallel-size", "1"], Runtime("cuda"))
assert args.distributed_backend == "nccl" and not args.use_cpu_initialization and args.transformer_impl == "local"
assert not (args.gradient_accumulation_fusion or args.apply_rope_fusion or args.masked_softmax_fusion)
assert args.no_persist_layer_norm
print("ok")
"""


def test_gpu_run_without_te_or_apex_turns_off_the_fusions_it_lacks():
    """Megatron's defaults fuse RoPE, weight-gradient accumulation, the layer norm and the masked
    softmax; without Transformer Engine and apex the local layers would fail at build or first step.
    A run that asked for no layer implementation gets the local layers, and one line says so."""
    out = run_python(GPU_WITHOUT_KERNELS, env={"RANK": "0", "WORLD_SIZE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
    assert "kernels for these Megatron fusions are not installed" in out.stdout
    notice = [line for line in out.stdout.splitlines() if "Transformer Engine is not available" in line]
    assert len(notice) == 1 and "transformer_engine is not installed" in notice[0], out.stdout


TE_WITHOUT_APEX = """
import copy, os, torch.distributed as dist
import sed_megatron.runtime as runtime
runtime._TE_IMPORT[:] = [None]    # the boundary: Transformer Engine's layers import; apex is absent here
from sed_megatron.training.parse import parse_run_args
argv = ["--config", "examples/tiny_cpu.yaml", "--tensor-model-parallel-size", "1", "--transformer-impl", "transformer_engine"]
args, _ = parse_run_args(argv, runtime.Runtime("cuda"))
assert args.transformer_impl == "transformer_engine" and not args.gradient_accumulation_fusion
# GPTModel's output layer is Megatron's ColumnParallelLinear with either implementation: built from
# this run's config it passes the check that raises without apex's fused_weight_gradient_mlp_cuda.
runtime.apply_cpu_runtime()       # its "GPU" allocations land on the CPU
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + os.environ["PORT"])
from megatron.core import parallel_state, tensor_parallel
from megatron.training.argument_utils import core_transformer_config_from_args
parallel_state.initialize_model_parallel()
tensor_parallel.model_parallel_cuda_manual_seed(1)
args.apply_rope_fusion = False    # Megatron checks TE itself for fused RoPE: not what is under test
config = core_transformer_config_from_args(args)
def output_layer(config):
    return tensor_parallel.ColumnParallelLinear(config.hidden_size, 256, config=config, init_method=config.init_method,
                                                bias=False, gather_output=False,
                                                tp_group=parallel_state.get_tensor_model_parallel_group())
output_layer(config)
fused = copy.copy(config)
fused.gradient_accumulation_fusion = True  # Megatron's default, which the run had before the fix
try:
    output_layer(fused)
except RuntimeError as err:
    assert "fused_weight_gradient_mlp_cuda" in str(err), err
else:
    raise AssertionError("the check did not raise: this test no longer reaches it")
print("ok")
"""


def test_gpu_run_with_te_and_without_apex_builds_its_output_layer():
    """A pip install of .[gpu] (Transformer Engine, no apex): gradient-accumulation fusion is off
    with the TE layers too, so GPTModel's output layer builds."""
    out = run_python(TE_WITHOUT_APEX, env={"RANK": "0", "WORLD_SIZE": "1", "PORT": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
    assert "so they are off: --no-gradient-accumulation-fusion" in out.stdout


def test_layer_implementation_is_never_a_silent_fallback(monkeypatch):
    from sed_megatron import runtime

    gpu, cpu = runtime.Runtime("cuda"), runtime.Runtime("cpu")
    broken = "import transformer_engine.pytorch failed: OSError: libcudnn.so.9: cannot open shared object file"
    monkeypatch.setattr(runtime, "_TE_IMPORT", [broken])
    with pytest.raises(runtime.LayerImplementationError) as err:
        runtime.layer_implementation("transformer_engine", gpu)  # asked for: one line naming the import error
    assert "\n" not in str(err.value) and broken in str(err.value) and str(err.value).startswith("--transformer-impl")
    impl, notice = runtime.layer_implementation(None, gpu)  # asked for nothing: the local layers, said once
    assert impl == "local" and broken in notice and "--transformer-impl transformer_engine makes this an error" in notice
    assert runtime.layer_implementation("local", gpu) == ("local", None)
    assert runtime.layer_implementation(None, cpu) == ("local", None)
    monkeypatch.setattr(runtime, "_TE_IMPORT", [None])
    assert runtime.layer_implementation(None, gpu) == ("transformer_engine", None)
    assert runtime.layer_implementation("transformer_engine", gpu) == ("transformer_engine", None)
    assert runtime.requested_transformer_impl(["--transformer-impl", "local", "--x", "--transformer-impl=transformer_engine"]) \
        == "transformer_engine"
    assert runtime.requested_transformer_impl(["--config", "x.yaml"]) is None


def test_training_asking_for_te_without_it_stops_with_one_line(tmp_path):
    """A recipe's transformer_impl: transformer_engine on a machine that cannot import it."""
    out = subprocess.run([sys.executable, "-m", "sed_megatron.train", "--config", "examples/tiny_cpu.yaml",
                          "--tensor-model-parallel-size", "1", "--transformer-impl", "transformer_engine",
                          "--save", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "sed_megatron.train: error: --transformer-impl transformer_engine: Transformer Engine cannot be used "
        "(transformer_engine is not installed); install it (pip install '.[gpu]') or ask for --transformer-impl local"]
    assert not (tmp_path / "out").exists()


def test_self_launch_fills_the_gpus():
    from sed_megatron.launch import local_world_size
    from sed_megatron.utils import UsageError

    assert local_world_size(2, "cpu") == (2, None)
    assert local_world_size(2, "cuda", 8) == (8, None)  # 4 data-parallel replicas of TP x PP x CP = 2
    assert local_world_size(1, "cuda", 8) == (8, None)
    used, notice = local_world_size(3, "cuda", 8)
    assert used == 6 and notice == "8 GPUs and TP x PP x CP = 3: 6 ranks (2 data-parallel replicas), 2 GPU(s) idle"
    with pytest.raises(UsageError, match="TP x PP x CP = 16 ranks need 16 GPUs and this machine has 8"):
        local_world_size(16, "cuda", 8)
    from sed_megatron.runtime import Runtime

    assert "TORCHDYNAMO_DISABLE" not in Runtime("cuda").launch_env()  # Megatron's compiled fusions stay on
    assert Runtime("cpu").launch_env()["TORCHDYNAMO_DISABLE"] == "1"


def _synchronous_save(directory, in_process):
    """A torch_dist save and load on this rank: (whether it loads back, the processes the save
    started). The ranks of run_distributed are daemonic: a child process there is an error, caught."""
    import multiprocessing

    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from sed_megatron.runtime.mcore import save_results_in_process

    os.makedirs(directory)
    kept = filesystem_async._results_queue
    filesystem_async._results_queue = None  # as a fresh process has it
    try:
        if in_process:
            save_results_in_process()
        try:
            dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", torch.arange(8.0), replica_id=0)},
                                    directory)
        except AssertionError as err:  # "daemonic processes are not allowed to have children"
            return False, [str(err)]
        loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(8), replica_id=0)},
                                         directory)
        return torch.equal(loaded["w"], torch.arange(8.0)), [p.name for p in multiprocessing.active_children()]
    finally:
        filesystem_async._results_queue = kept


def test_a_synchronous_save_starts_no_helper_process(tmp_path):
    """Megatron collects a save's write results through a spawned Manager process (seconds on
    the first save, left behind by a rank killed with kill -9); in-process, none is started."""
    from tests.distributed import run_distributed

    assert run_distributed(_synchronous_save, world_size=1, args=(str(tmp_path / "a"), True)) == (True, [])
    # Megatron's own way starts the Manager (refused on these daemonic ranks): what the first call checks is gone
    assert run_distributed(_synchronous_save, world_size=1, args=(str(tmp_path / "b"), False)) == \
        (False, ["daemonic processes are not allowed to have children"])
