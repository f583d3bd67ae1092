"""Run a function on N local gloo processes with Megatron model parallelism initialized.

    run_distributed(check_fn, world_size=4, tp=2, pp=2, args=(...,))   # cp=2: context parallel too

check_fn(*args) runs on every rank after `init_process_group`, and
`parallel_state.initialize_model_parallel(tp, pp, cp)`; an exception on any rank fails the call with
that rank's traceback. device="cpu" (the default, also on a GPU machine): gloo and the CPU
layer; device="cuda": NCCL, one GPU per rank, torch untouched. check_fn must be importable by module path
(a module-level function), since the processes are spawned.
"""

import os

import torch.multiprocessing as mp

from sed_megatron.utils import free_port


def _worker(rank, world_size, port, tp, pp, cp, device, fn, args):
    import torch
    import torch.distributed as dist

    from sed_megatron.runtime import apply_cpu_runtime, prepare_megatron

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    prepare_megatron()
    if device == "cpu":
        torch.set_num_threads(1)  # N processes share the cores of a small machine
        apply_cpu_runtime()
    else:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    backend = "gloo" if device == "cpu" else "nccl"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    from megatron.core import parallel_state

    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
        )
        fn(*args)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn, world_size, tp=1, pp=1, args=(), device="cpu", cp=1):
    """Run fn(*args) on world_size spawned ranks with TP=tp, PP=pp, CP=cp (DP = the rest)."""
    if world_size % (tp * pp * cp):
        raise ValueError(f"world_size {world_size} is not a multiple of tp*pp*cp = {tp * pp * cp}")
    mp.spawn(_worker, args=(world_size, free_port(), tp, pp, cp, device, fn, args), nprocs=world_size, join=True)
