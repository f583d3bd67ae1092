"""run_distributed: a check on N ranks with Megatron's model parallelism set up, on processes kept
for the whole test session (one set per world size, device and start-up environment).

    from tests.distributed import run_distributed
    run_distributed(check_fn, world_size=4, tp=2, pp=2, args=(...,))   # cp=2: context parallel too
    value = run_distributed(fn, world_size=1)                          # what fn returned on rank 0
    run_distributed(fn, world_size=2, tp=2, env={"TRITON_INTERPRET": "1"})   # read at import: a set of its own

check_fn(*args) runs on every rank with Megatron's model parallelism initialized at TP x PP x CP
(DP = the rest), on the CPU layer over gloo (device="cuda": NCCL, one GPU per rank), and an
exception on any rank fails the call with that rank's traceback. Starting a process (torch,
Megatron) costs seconds on 2 cores, so the ranks are started once and run one check after the
other. Between checks the model-parallel state is torn
down and the default random generator reseeded as a fresh process has it. A failed check (or a
rank that dies, or a timeout) ends that set of processes: the next call starts a fresh one.
"""

import atexit
import importlib
import multiprocessing
import os
import queue as queue_module
import time
import traceback

_POOLS = {}  # (world size, device, environment) -> _Pool


def _destroy_subgroups(dist):
    """Megatron's destroy_model_parallel forgets its groups without destroying them: each keeps
    gloo threads that poll (hundreds after a few checks, a good part of a core). Destroy every
    group but the default one."""
    from torch.distributed import distributed_c10d

    default = distributed_c10d._get_default_group()
    for group in list(distributed_c10d._world.pg_map):
        if group is not default:
            dist.destroy_process_group(group)


def _release_memory():
    """What a check built is garbage now: give the memory back to the system (a process waiting
    between checks should not hold a model's worth of it)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _serve(rank, world_size, port, tasks, results, device):
    import torch
    import torch.distributed as dist

    from sed_megatron.runtime import apply_cpu_runtime, prepare_megatron

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    prepare_megatron()
    if device == "cpu":
        torch.set_num_threads(1)  # N processes share the cores of a small machine
        apply_cpu_runtime()
    else:  # NCCL, one GPU per rank, torch untouched
        torch.cuda.set_device(rank % torch.cuda.device_count())
    fresh_seed = torch.initial_seed()  # what the default generator starts from in a new process
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)  # the parent's: see _Pool
    dist.init_process_group("gloo" if device == "cpu" else "nccl", store=store, rank=rank, world_size=world_size)
    from megatron.core import parallel_state

    while True:
        task = tasks.get()
        if task is None:
            break
        module, qualname, tp, pp, cp, args = task
        try:
            fn = importlib.import_module(module)
            for part in qualname.split("."):
                fn = getattr(fn, part)
            torch.manual_seed(fresh_seed)
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp)
            try:
                value = fn(*args)
            finally:
                parallel_state.destroy_model_parallel()
                _destroy_subgroups(dist)
                _release_memory()
            results.put((rank, None, value if rank == 0 else None))
        except BaseException:  # noqa: BLE001 — every failure goes back to the test
            results.put((rank, traceback.format_exc(), None))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size, device, env):
        context = multiprocessing.get_context("spawn")
        self.world_size = world_size
        self.tasks = [context.SimpleQueue() for _ in range(world_size)]
        self.results = context.Queue()
        # The parent holds the world's store, on a port the system picked and kept: a port chosen
        # free and bound later by a rank can be taken in between by another test's process.
        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
        self.processes = [context.Process(target=_serve, daemon=True, args=(
            rank, world_size, self.store.port, self.tasks[rank], self.results, device)) for rank in range(world_size)]
        saved = dict(os.environ)
        os.environ.update(env)  # read at import in the ranks (TRITON_INTERPRET): they start with it
        try:
            for process in self.processes:
                process.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def run(self, fn, tp, pp, cp, args, timeout):
        for tasks in self.tasks:
            tasks.put((fn.__module__, fn.__qualname__, tp, pp, cp, args))
        done, deadline, returned = set(), time.monotonic() + timeout, None
        while len(done) < self.world_size:
            try:
                rank, failure, value = self.results.get(timeout=1.0)
            except queue_module.Empty:
                dead = [rank for rank, p in enumerate(self.processes) if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"{fn.__qualname__}: rank {dead[0]} died (exit code "
                                       f"{self.processes[dead[0]].exitcode})") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{fn.__qualname__}: no result within {timeout} s") from None
                continue
            if failure is not None:
                raise RuntimeError(f"{fn.__qualname__} failed on rank {rank}:\n{failure}")
            done.add(rank)
            returned = value if rank == 0 else returned
        return returned

    def close(self):
        for tasks, process in zip(self.tasks, self.processes):
            if process.is_alive():
                try:
                    tasks.put(None)
                except OSError:
                    pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


def run_distributed(fn, world_size, tp=1, pp=1, args=(), cp=1, timeout=600, device="cpu", env=None):
    """Run fn(*args) on the session's world_size ranks with TP=tp, PP=pp, CP=cp (DP = the rest);
    returns what it returned on rank 0 (it must pickle). device="cuda": NCCL, one GPU per rank.
    env: variables the ranks must have from their start (read at import): a set of its own."""
    if world_size % (tp * pp * cp):
        raise ValueError(f"world_size {world_size} is not a multiple of tp*pp*cp = {tp * pp * cp}")
    key = (world_size, device, tuple(sorted((env or {}).items())))
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = _Pool(world_size, device, env or {})
    try:
        return pool.run(fn, tp, pp, cp, args, timeout)
    except BaseException:
        # Other ranks may wait in a collective forever: this set of processes is done.
        _POOLS.pop(key, None)
        for process in pool.processes:
            process.kill()
        for process in pool.processes:
            process.join()
        raise


@atexit.register
def close_all():
    """Stop every set of processes (also at the end of the test session: tests/conftest.py)."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.close()
