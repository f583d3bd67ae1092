"""Running a step in processes of its own: a function in a spawned process, a module under torchrun.

    done = run_isolated(convert_hf_to_mcore, hf_dir, save, log="convert.log")  # returns what it returned
    with pytest.raises(ValueError, match="shape mismatch"):                     # re-raises what it raised
        run_isolated(convert_hf_to_mcore, broken_dir, save)
    torchrun("sed_megatron.train", ["--config", "run.yaml"], nproc=2, log="train.log")

run_isolated: the function's global state (torch.distributed, Megatron's parsed args and
parallel state, sys.argv, the CPU layer) dies with its process. fn must be a module-level
function (imported by name in the child); its arguments and result must pickle. The child
inherits os.environ plus `env`; its output goes to the parent's, or to `log`.
"""

import importlib
import multiprocessing
import os
import queue as queue_module
import signal
import subprocess
import sys
import threading
import time
import traceback

_ENV = {"TORCHDYNAMO_DISABLE": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": "1"}


class IsolatedError(RuntimeError):
    """The child failed with an exception that does not pickle, or died."""


class StepFailed(RuntimeError):
    """A torchrun step exited non-zero; the message ends with the tail of its log."""


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
                      "TORCHELASTIC_RESTART_COUNT")
OUTSIDE_THE_WORLD = dict.fromkeys(TORCHRUN_VARIABLES)
"""run_isolated's env for a one-process step started from a rank: the rank's world variables removed."""


def _child(queue, module, qualname, args, kwargs, env, log):
    for name, value in env.items():  # before anything heavy is imported; None: removed
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if log is not None:  # the child's output (and its children's) into the log
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
    try:
        fn = importlib.import_module(module)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        queue.put(("ok", fn(*args, **kwargs)))
    except BaseException as err:  # noqa: BLE001 — everything goes back to the parent
        text = traceback.format_exc()
        try:
            queue.put(("raised", err, text))
        except Exception:  # the exception itself does not pickle
            queue.put(("raised", None, text))


def run_isolated(fn, *args, env=None, timeout=600, log=None, **kwargs):
    """fn(*args, **kwargs) in a spawned process; its return value, or its exception re-raised.
    env: variables set in it (None: removed; OUTSIDE_THE_WORLD for a step started from a rank)."""
    return start_isolated(fn, *args, env=env, log=log, **kwargs).result(timeout)


class Isolated:
    """A function running in a spawned process (start_isolated): done() polls, result() waits."""

    def __init__(self, fn, process, queue):
        self.name, self._process, self._queue, self._outcome = fn.__qualname__, process, queue, None

    def done(self):
        if self._outcome is None:
            try:
                self._outcome = self._queue.get_nowait()
            except queue_module.Empty:
                if not self._process.is_alive() and self._queue.empty():  # died without a word (a crash, os._exit)
                    self._outcome = ("died", self._process.exitcode)
        return self._outcome is not None

    def result(self, timeout=600):
        """Its return value, or its exception re-raised (IsolatedError: it died, or gave nothing in time)."""
        deadline = time.monotonic() + timeout
        while self._outcome is None:
            try:
                self._outcome = self._queue.get(timeout=1.0)
            except queue_module.Empty:
                if self.done():
                    break
                if time.monotonic() > deadline:
                    self._process.kill()
                    self._process.join()
                    raise IsolatedError(f"{self.name} gave no result within {timeout} s") from None
        self._process.join()
        if self._outcome[0] == "ok":
            return self._outcome[1]
        if self._outcome[0] == "died":
            raise IsolatedError(f"{self.name}: the isolated process exited with {self._outcome[1]}")
        _, err, text = self._outcome
        if isinstance(err, Exception):
            raise err from IsolatedError(f"in the isolated process:\n{text}")
        raise IsolatedError(f"{self.name} failed in the isolated process:\n{text}")


def start_isolated(fn, *args, env=None, log=None, **kwargs):
    """fn(*args, **kwargs) started in a spawned process, without waiting: an Isolated."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, fn.__module__, fn.__qualname__, args, kwargs,
                                                   {**_ENV, **(env or {})}, log))
    process.start()
    return Isolated(fn, process, queue)


def torchrun(module, argv, nproc=1, log=None, timeout=None, env=None):
    """`torchrun --nproc_per_node nproc -m module argv` from the current directory; StepFailed
    (naming the log, with its tail) if it exits non-zero. Output goes to `log` (default: inherited).
    One rank starts without torchrun's agent (a process less to start), with the variables the
    agent would give it."""
    full_env = {**os.environ, **_ENV, **(env or {})}
    store = None
    if nproc == 1:
        store, world = world_store(1)  # held here while the rank runs
        full_env.update(world, RANK="0", LOCAL_RANK="0")
        cmd = [sys.executable, "-m", module, *map(str, argv)]
    else:  # --standalone: the agent's store takes a port the system picks
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
               module, *map(str, argv)]
    if log is None:
        returncode = subprocess.run(cmd, env=full_env, timeout=timeout).returncode
    else:
        with open(log, "w") as out:
            returncode = subprocess.run(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                        timeout=timeout).returncode
    if returncode != 0:
        tail = ""
        if log is not None:
            with open(log) as f:
                tail = ":\n" + f.read()[-3000:]
        raise StepFailed(f"{module} exited with {returncode} (log {log}){tail}")


def local_world_size(model_parallel, device, gpu_count=0):
    """(ranks a tool started without torchrun runs on this machine, a line saying why GPUs stay idle, or None).

    On the CPU one model replica's TP x PP x CP ranks (more would only share the cores). On a GPU
    machine every GPU: data-parallel replicas of TP x PP x CP ranks each; a GPU count that is not
    a multiple of it uses the largest multiple. UsageError when it has fewer GPUs than one replica needs."""
    from .utils import UsageError

    if device == "cpu":
        return model_parallel, None
    if gpu_count < model_parallel:
        raise UsageError(f"TP x PP x CP = {model_parallel} ranks need {model_parallel} GPUs and this machine has "
                         f"{gpu_count}: start the run with torchrun on several nodes (launch/torchrun_multinode.sh)")
    used = gpu_count // model_parallel * model_parallel
    if used == gpu_count:
        return used, None
    return used, (f"{gpu_count} GPUs and TP x PP x CP = {model_parallel}: {used} ranks ({used // model_parallel} "
                  f"data-parallel replicas), {gpu_count - used} GPU(s) idle")


def world_store(nproc):
    """(a store server, the variables of a world of nproc local ranks that use it): as torchrun's
    agent does, the launcher holds the store on a port the system picked, and every rank (rank 0
    too) connects to it. Keep the store alive while the ranks run."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False)
    return store, {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                   "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"}


STOP_GRACE_S = 5.0
"""After a rank fails, how long spawn_workers lets the others end by themselves (and print their
error) before it kills them."""


def spawn_workers(module, argv, nproc, env=None):
    """Run `python -m module argv` as nproc ranks of one torch.distributed world (RANK, WORLD_SIZE,
    MASTER_ADDR, ... set as torchrun would), their output passed through; the first non-zero exit
    code (the rest are given STOP_GRACE_S to end on their own, then killed; a rank killed by signal N
    gives 128 + N, as a shell reports it), else 0.
    A tool started without torchrun launches itself this way.
    env: the ranks' extra environment (an entry point passes its Runtime's `launch_env()`);
    default: the CPU one (eager mode, one thread per rank). SIGTERM to this process is passed on
    to the ranks, as torchrun does (training saves and exits with --exit-signal-handler), and
    this process waits for them."""
    extra = _ENV if env is None else env
    store, world = world_store(nproc)
    procs = []

    def pass_on(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()  # where a handler can be set
    previous = signal.signal(signal.SIGTERM, pass_on) if in_main_thread else None
    code = 0
    try:
        for rank in range(nproc):
            rank_env = {**os.environ, **extra, **world, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([sys.executable, "-m", module, *map(str, argv)], env=rank_env))
        while True:
            codes = [p.poll() for p in procs]  # every rank's: a rank that died while rank 0 runs is seen now
            failed = [c for c in codes if c not in (None, 0)]
            if failed or None not in codes:
                code = failed[0] if failed else 0
                break
            time.sleep(0.1)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        grace_ends = time.monotonic() + (STOP_GRACE_S if code else 0)
        for p in procs:
            if p.poll() is None:
                try:  # a failure is usually seen by every rank: let them report it before they are stopped
                    p.wait(timeout=max(0.0, grace_ends - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
            p.wait()
    return 128 - code if code < 0 else code
