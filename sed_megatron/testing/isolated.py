"""Call a function in a fresh spawned process: its global state (torch.distributed, Megatron's
parsed args and parallel state, sys.argv, the CPU runtime layer) dies with that process.

    done = run_isolated(convert_hf_to_mcore, hf_dir, save)          # returns what it returned
    with pytest.raises(ValueError, match="shape mismatch"):         # re-raises what it raised
        run_isolated(convert_hf_to_mcore, broken_dir, save)

fn must be a module-level function (it is imported by name in the child); its arguments and
result must pickle. The child inherits os.environ plus `env`; its output goes to the parent's.
"""

import importlib
import multiprocessing
import os
import queue as queue_module
import time
import traceback

_ENV = {"TORCHDYNAMO_DISABLE": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": "1"}


class IsolatedError(RuntimeError):
    """The child failed with an exception that does not pickle, or died."""


def _child(queue, module, qualname, args, kwargs, env):
    os.environ.update(env)  # before anything heavy is imported
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


def run_isolated(fn, *args, env=None, timeout=600, **kwargs):
    """fn(*args, **kwargs) in a spawned process; its return value, or its exception re-raised."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, fn.__module__, fn.__qualname__, args, kwargs,
                                                   {**_ENV, **(env or {})}))
    process.start()
    deadline = time.monotonic() + timeout
    outcome = None
    while outcome is None:
        try:
            outcome = queue.get(timeout=1.0)
        except queue_module.Empty:
            if not process.is_alive() and queue.empty():  # died without a word (a crash, os._exit)
                raise IsolatedError(f"{fn.__qualname__}: the isolated process exited with {process.exitcode}") from None
            if time.monotonic() > deadline:
                process.kill()
                process.join()
                raise IsolatedError(f"{fn.__qualname__} gave no result within {timeout} s") from None
    process.join()
    if outcome[0] == "ok":
        return outcome[1]
    _, err, text = outcome
    if isinstance(err, Exception):
        raise err from IsolatedError(f"in the isolated process:\n{text}")
    raise IsolatedError(f"{fn.__qualname__} failed in the isolated process:\n{text}")
