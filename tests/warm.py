"""Entry points run as fresh processes forked from one that has already imported them.

    code = run("sed_megatron.train", argv, log="train.log", nproc=2)   # as `torchrun ... -m sed_megatron.train argv`

Starting a process that imports torch, Megatron-LM and transformers costs 5-6 s of CPU on the
2-core machine, and the suite starts ~100 of them: most of its time. A server process (spawned
once per session, with the suite's environment) imports those modules once; each request forks
one child per rank from it. A child is a fresh process in every other way: its own pid and
session, environment, working directory and output file, `python -m module argv` semantics
(runpy, `__main__`), its exit code reported back. Nothing that touches devices, threads or
process groups runs in the server before a fork, which is what makes fork safe here.

Use it where a test only needs the command to run to completion; tests that signal or kill a
running process, or need another import-time environment (TRITON_INTERPRET, PYTHONPATH), start
their own processes. SED_MEGATRON_TESTS_NO_FORK=1 runs every request as a plain subprocess.
"""

import atexit
import multiprocessing
import os
import subprocess
import sys

PRELOAD = ("sed_megatron.train", "sed_megatron.cli.calibrate_tau", "sed_megatron.cli.compare_hf_mcore",
           "sed_megatron.cli.convert_hf_to_mcore", "sed_megatron.cli.convert_mcore_to_hf", "transformers",
           # What they import inside functions, on first use (~1,800 modules, 1.5-2.5 s a child):
           "sed_megatron.convert.hf_to_mcore", "sed_megatron.convert.mcore_to_hf", "sed_megatron.training.provider",
           "megatron.training.training", "megatron.training.checkpointing", "megatron.training.initialize",
           "megatron.core.models.gpt.gpt_layer_specs", "megatron.core.dist_checkpointing.serialization",
           "megatron.core.tokenizers", "torch.distributed.checkpoint", "torch.distributed.tensor", "torch._dynamo",
           "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto")
IMPORT_TIME_ENV = ("TORCHDYNAMO_DISABLE", "OMP_NUM_THREADS", "CUDA_DEVICE_MAX_CONNECTIONS", "TRITON_INTERPRET",
                   "PYTHONPATH", "CUDA_VISIBLE_DEVICES")
"""Variables read when the preloaded modules are imported: a request that sets them otherwise than
the server had them runs as a plain subprocess."""

_server = []  # [(process, connection, environment)]


def _child(target, argv, env, cwd, stdout, stderr):
    """In the forked child: become `python -m target argv` (or `python target argv` for a .py path); never returns."""
    code = 1
    try:
        os.setsid()
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        for stream, path in ((1, stdout), (2, stderr or stdout)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, stream)
            os.close(fd)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        sys.argv = [target if isinstance(target, str) else "python", *argv]
        # multiprocessing as a fresh interpreter has it (the server was spawned: its start method and
        # process object would otherwise be the child's, and a DataLoader's workers would be spawned).
        import multiprocessing.process
        import runpy

        multiprocessing.set_start_method(None, force=True)
        current = multiprocessing.process.current_process()
        current._config.pop("daemon", None)
        current._identity, current._parent_pid, current._name = (), None, "MainProcess"
        multiprocessing.process._parent_process = None

        try:
            if isinstance(target, tuple):  # a function: its result (or exception) pickled per rank
                _call(*target)
            elif target.endswith(".py"):
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python target` has it
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, (int, type(None))):
                print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a crash is the child's exit code 1, with its traceback
        import traceback

        traceback.print_exc()
    finally:
        try:
            # What an interpreter's exit runs: multiprocessing's finalizers among them, which stop
            # the Manager process a checkpoint save starts (left running, each holds ~0.5 GB).
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _call(module, qualname, args_path, result_dir):
    import importlib
    import pickle
    import traceback

    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    with open(args_path, "rb") as f:
        args, kwargs = pickle.load(f)
    try:
        outcome = ("ok", fn(*args, **kwargs))
    except Exception as err:  # noqa: BLE001 - it goes back to the caller, who re-raises it
        outcome = ("raised", err, traceback.format_exc())
    with open(os.path.join(result_dir, os.environ.get("RANK", "0")), "wb") as f:
        pickle.dump(outcome, f)


def _serve(connection, env):
    """The server: import PRELOAD, then fork the ranks of each request and report their exit codes."""
    import importlib
    import signal
    import time

    os.environ.clear()
    os.environ.update(env)
    for name in PRELOAD:
        importlib.import_module(name)
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        pids = []
        for rank_env in request["ranks"]:
            pid = os.fork()
            if pid == 0:
                connection.close()
                _child(request["target"], request["argv"], rank_env, request["cwd"], request["stdout"], request["stderr"])
            pids.append(pid)
        codes = dict.fromkeys(pids)
        deadline = time.monotonic() + request["timeout"]
        while any(code is None for code in codes.values()):
            for pid in [p for p, c in codes.items() if c is None]:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
            failed = [c for c in codes.values() if c not in (None, 0)]
            if failed or time.monotonic() > deadline:  # a rank failed (the others would wait forever) or time is up
                for pid, code in codes.items():
                    if code is None:
                        try:
                            os.killpg(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                for pid, code in codes.items():
                    if code is None:
                        codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                if not failed:
                    codes = dict.fromkeys(pids, "timeout")
            time.sleep(0.05)
        connection.send([codes[pid] for pid in pids])


def _connection(key):
    """The server whose import-time environment is `key` (started, or restarted, as needed)."""
    if _server and _server[0][0].is_alive() and _server[0][2] == key:
        return _server[0][1]
    close()
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve, args=(child, {**os.environ, **key}))  # not a daemon: its children may start processes
    saved = dict(os.environ)
    os.environ.update(key)  # the server's interpreter starts with them (sys.path, OpenMP's threads)
    for name in IMPORT_TIME_ENV:
        if name not in key:
            os.environ.pop(name, None)
    try:
        process.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    child.close()
    _server.append((process, parent, key))
    return parent


@atexit.register  # before multiprocessing's own exit handler, which would wait for it
def close():
    """Stop the server (the next request starts one)."""
    while _server:
        process, connection, _ = _server.pop()
        connection.close()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()


def run(target, argv, env=None, cwd=None, log=os.devnull, nproc=1, timeout=600, stderr=None, world=False):
    """`python -m target argv` (`python target argv` for a .py path) as nproc ranks of one world
    (torchrun's variables; for nproc 1 only with world=True), output appended to log (stderr to `stderr` if given);
    the first non-zero exit code, else 0 (subprocess.TimeoutExpired after timeout)."""
    from sed_megatron.launch import world_store

    env = dict(os.environ if env is None else env)
    cwd = os.getcwd() if cwd is None else cwd
    ranks, store = [env], None
    if nproc > 1 or world:
        store, world_env = world_store(nproc)  # held here until the ranks are done
        ranks = [{**env, **world_env, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(nproc)]
    if os.environ.get("SED_MEGATRON_TESTS_NO_FORK") == "1" and not isinstance(target, tuple):
        return _subprocess(target, argv, ranks, cwd, log, stderr, timeout)
    connection = _connection({name: env[name] for name in IMPORT_TIME_ENV if name in env})
    connection.send({"target": target, "argv": [str(a) for a in argv], "ranks": ranks, "cwd": cwd, "stdout": log,
                     "stderr": stderr, "timeout": timeout})
    codes = connection.recv()
    if "timeout" in codes:
        raise subprocess.TimeoutExpired([target, *argv], timeout)
    return next((code for code in codes if code != 0), 0)


def capture(target, argv, env=None, cwd=None, nproc=1, timeout=600):
    """run() with stdout and stderr captured: a subprocess.CompletedProcess (text)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        open(out, "w").close()
        open(err, "w").close()
        code = run(target, argv, env, cwd, out, nproc, timeout, stderr=err)
        with open(out) as f, open(err) as g:
            return subprocess.CompletedProcess([target, *argv], code, f.read(), g.read())


def call(fn, *args, nproc=1, env=None, cwd=None, log=os.devnull, timeout=600, **kwargs):
    """fn(*args, **kwargs) in a forked process (nproc ranks of one world, torchrun's variables): what
    it returned on rank 0, or the exception it raised there re-raised. fn: a module-level function;
    arguments and result must pickle."""
    import pickle
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args_path = os.path.join(tmp, "args")
        with open(args_path, "wb") as f:
            pickle.dump((args, kwargs), f)
        code = run((fn.__module__, fn.__qualname__, args_path, tmp), [], env, cwd, log, nproc, timeout, world=True)
        result = os.path.join(tmp, "0")
        if not os.path.exists(result):
            raise RuntimeError(f"{fn.__qualname__}: rank 0 exited with {code} without a result (log: {log})")
        with open(result, "rb") as f:
            outcome = pickle.load(f)
    if outcome[0] == "raised":
        raise outcome[1] from RuntimeError(f"in the forked process:\n{outcome[2]}")
    if code != 0:
        raise RuntimeError(f"{fn.__qualname__}: a rank exited with {code} (log: {log})")
    return outcome[1]


def _subprocess(target, argv, ranks, cwd, log, stderr, timeout):
    command = [sys.executable, target] if target.endswith(".py") else [sys.executable, "-m", target]
    with open(log, "a") as out, open(stderr or log, "a") as err:
        procs = [subprocess.Popen([*command, *map(str, argv)], cwd=cwd, env=rank_env, stdout=out,
                                  stderr=err if stderr else subprocess.STDOUT) for rank_env in ranks]
        try:
            codes = [proc.wait(timeout=timeout) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
    return next((code for code in codes if code != 0), 0)
