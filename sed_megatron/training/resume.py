"""Resume from --save by default, and the account of torchrun's restarts.

    argv = resumed_argv(argv, flags, prog)          # --load SAVE when SAVE holds a checkpoint
    state = RunState.at_start(flags.save, prog)      # restart n: what was lost; stops a restart without progress

A run whose --save holds a complete checkpoint (its tracker file, written atomically and last)
continues from it: --load is the save directory, and --finetune / --no-load-optim /
--no-load-rng are dropped (model, optimizer, RNG, iteration and data position come back), so a
worker restarted by torchrun (launch/train.sh: --max-restarts) resumes on its own. --no-resume
(YAML `resume: false`) starts afresh into a used --save.

The state of the job lives in <save>/.run/ (cheap, each file replaced atomically):
- progress.json: the last finished iteration and its time (the metrics rank, every iteration);
- errors/<run>-<attempt>-<rank>.json: the first line of the error a rank ended with;
- restarts.json: one record per failed attempt of this torchrun job (TORCHELASTIC_RUN_ID):
  where it failed (the iteration after the last finished one), its first error.
At a restart (job_attempt() > 0: the rendezvous's round) the log says what was lost; the first
metrics.jsonl record after it carries `restart`. When the previous two attempts failed at the
same iteration, the attempt stops at once with one line and exit code 5, before Megatron is
imported: torchrun's remaining restarts stop the same way.
"""

import contextlib
import json
import os
import re
import sys
import time

from sed_megatron.runtime.mcore import TRACKER_FILE
from sed_megatron.utils import atomic_write_text

STATE_DIR = ".run"
NO_PROGRESS_EXIT = 5
UNRECORDED = "killed by a signal (no error recorded)"
RESUME_UNSETS = ("finetune", "no_load_optim", "no_load_rng")
"""What a resume turns off: the checkpoint in --save is this run's own, optimizer and RNG included."""
_COLLATERAL = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|"
                         r"recvBytes|sendBytes|ProcessGroupGloo|NCCL communicator was aborted")
"""A collective that failed because another rank vanished: not the first error of an attempt."""


def resume_dir(flags):
    """The directory the run resumes from: --save when it holds a checkpoint (and --no-resume is not given)."""
    save = getattr(flags, "save", None)
    if not save or not getattr(flags, "resume", True):
        return None
    return save if os.path.exists(os.path.join(save, TRACKER_FILE)) else None


def checkpoint_iteration(save):
    """The iteration the tracker in save names (0: none, or 'release')."""
    try:
        with open(os.path.join(save, TRACKER_FILE)) as f:
            text = f.read().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def resumed_argv(argv, flags, prog):
    """argv loading the run's own newest checkpoint in --save, when there is one (else argv)."""
    save = resume_dir(flags)
    if save is None:
        return argv
    if int(os.environ.get("RANK", "0")) == 0:
        given = f" ({flags.load} is not loaded again)" if flags.load and not _same(flags.load, save) else ""
        print(f"{prog}: resuming from the newest checkpoint in {save} (iteration {checkpoint_iteration(save)})"
              f"{given}; --no-resume starts afresh", flush=True)
    return [*argv, "--load", save]


def adjust_for_resume(namespace):
    """The parsed flags of a resumed run (--load is --save's checkpoint): finetune and the
    no-load switches off, so the optimizer, the RNG and the iteration come back too."""
    save = resume_dir(namespace)
    if save is not None and namespace.load and _same(namespace.load, save):
        for dest in RESUME_UNSETS:
            setattr(namespace, dest, False)


def _same(a, b):
    return os.path.abspath(a) == os.path.abspath(b)


def _run_id():
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.environ.get("TORCHELASTIC_RUN_ID", "none"))


RDZV_ENDPOINT_ENV = "SED_MEGATRON_RDZV_ENDPOINT"
"""host:port of the job's c10d rendezvous (launch/train.sh sets it), where job_attempt reads the round."""
_ATTEMPT = []


def job_attempt():
    """The attempt of this torchrun job, the same on every rank of every node: the round of its
    c10d rendezvous (0 for the job's first). TORCHELASTIC_RESTART_COUNT is not: it counts the
    restarts of one agent after its own workers failed, and an agent that restarts its workers
    because another node's failed keeps its count. Without the endpoint (one agent, or the tests'
    self-started ranks) the restart count."""
    if not _ATTEMPT:
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        endpoint, run_id = os.environ.get(RDZV_ENDPOINT_ENV), os.environ.get("TORCHELASTIC_RUN_ID")
        if endpoint and run_id and not endpoint.endswith(":0"):  # port 0: one agent's own rendezvous
            import pickle
            from datetime import timedelta

            from torch.distributed import TCPStore
            from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

            host, _, port = endpoint.rpartition(":")
            try:
                store = TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=60))
                state = C10dRendezvousBackend(store, run_id).get_state()
                attempt = int(pickle.loads(state[0]).round)  # the rendezvous's own state: torch wrote it
            except Exception as err:  # noqa: BLE001 - said, and the agent's count instead
                print(f"sed_megatron.train: warning: the round of the rendezvous at {endpoint} is unknown "
                      f"({type(err).__name__}: {err}); counting attempts by this node's restarts", file=sys.stderr,
                      flush=True)
        _ATTEMPT.append(attempt)
    return _ATTEMPT[0]


def _attempt():
    return job_attempt()


def _read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


class RunState:
    """This attempt's place in its torchrun job, kept in <save>/.run (nothing without --save)."""

    _current = None  # the process's RunState, for record_error

    def __init__(self, save, run_id, attempt, restart=None):
        self.save, self.run_id, self.attempt = save, run_id, attempt
        self.directory = os.path.join(save, STATE_DIR) if save else None
        self.restart = restart
        """At a restart: {count, resumed_from, iterations_lost, failed_at, error, last_progress_time}."""
        self._writes = False
        RunState._current = self

    @classmethod
    def at_start(cls, save, prog, rank=None):
        """The state of this attempt; at a restart, the account of the failed one (global rank 0
        records it and prints it), or the stop of a restart that would not make progress."""
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        state = cls(save, _run_id(), _attempt())
        if state.attempt == 0:
            if rank == 0 and state.directory is not None:
                state._clear()  # an earlier job's account (the same run id may come again)
            return state
        if state.directory is None:
            if rank == 0:
                print(f"{prog}: restart {state.attempt}: no --save, so nothing to resume from: the run starts again "
                      f"from its beginning", flush=True)
            return state
        progress = _read_json(os.path.join(state.directory, "progress.json"), {})
        mine = progress.get("run_id") == state.run_id
        resumed_from = checkpoint_iteration(save)
        last = progress.get("iteration", 0) if mine else 0
        failed_at = max(last, resumed_from) + 1
        error = state.first_error(state.attempt - 1)
        history = [r for r in _read_json(os.path.join(state.directory, "restarts.json"), []) if
                   r.get("run_id") == state.run_id and r.get("attempt", -1) < state.attempt - 1]
        history.sort(key=lambda r: r["attempt"])
        record = {"run_id": state.run_id, "attempt": state.attempt - 1, "failed_at": failed_at, "error": error,
                  "resumed_from": resumed_from, "iterations_lost": max(0, last - resumed_from)}
        if rank == 0:
            atomic_write_text(os.path.join(state.directory, "restarts.json"),
                              json.dumps([*history, record], indent=1) + "\n")
        if history and history[-1]["attempt"] == state.attempt - 2 and history[-1]["failed_at"] == failed_at:
            first = record
            for earlier in reversed(history):  # the first attempt of this run of failures at failed_at
                if earlier["failed_at"] != failed_at:
                    break
                first = earlier
            if rank == 0:
                print(f"{prog}: error: no progress: iteration {failed_at} failed in the last two attempts "
                      f"(first error: {first['error']}); not restarting again (the newest checkpoint in {save}: "
                      f"iteration {resumed_from})", file=sys.stderr, flush=True)
            sys.exit(NO_PROGRESS_EXIT)
        state.restart = {"count": state.attempt, "resumed_from": resumed_from, "iterations_lost": record[
            "iterations_lost"], "failed_at": failed_at, "error": error,
            "last_progress_time": progress.get("time") if mine else None}
        if rank == 0:
            print(f"{prog}: restart {state.attempt}: iteration {failed_at} failed "
                  f"({error}); resuming from iteration {resumed_from} in {save}, {record['iterations_lost']} "
                  f"finished iteration(s) lost", flush=True)
        return state

    def _clear(self):
        import shutil

        for name in ("progress.json", "restarts.json"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.directory, name))
        shutil.rmtree(os.path.join(self.directory, "errors"), ignore_errors=True)

    def first_error(self, attempt):
        """The first line of the first error an attempt's ranks recorded, errors of collectives whose
        peer vanished last; UNRECORDED when none was."""
        errors = []
        directory = os.path.join(self.directory, "errors")
        prefix = f"{self.run_id}-{attempt}-"
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if name.startswith(prefix):
                record = _read_json(os.path.join(directory, name))
                if record:
                    errors.append((bool(record.get("collateral")), record.get("time", 0), record.get("line", "?")))
        errors.sort()
        return errors[0][2] if errors and not errors[0][0] else UNRECORDED

    # --- in the training loop ---

    def loop_started(self, iteration, writes_metrics, metrics_log=None, prog="sed_megatron.train"):
        """The loop starts after `iteration`: at a restart the time without training is known now."""
        self._writes = writes_metrics and self.directory is not None
        if self.restart is None:
            return
        since = self.restart.pop("last_progress_time")
        down = round(time.time() - since, 1) if since else None
        info = {key: self.restart[key] for key in ("count", "resumed_from", "iterations_lost")}
        info["down_s"] = down
        if metrics_log is not None and writes_metrics:
            metrics_log.annotate_next({"restart": info})
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{prog}: restart {info['count']}: training again from iteration {iteration + 1}; "
                  f"{info['iterations_lost']} iteration(s) to do again, "
                  f"{'unknown time' if down is None else f'{down} s'} without training since the last finished "
                  f"iteration", flush=True)

    def iteration_done(self, iteration):
        if self._writes:
            atomic_write_text(os.path.join(self.directory, "progress.json"), json.dumps(
                {"run_id": self.run_id, "attempt": self.attempt, "iteration": int(iteration), "time": time.time()}))

    def record_error(self, line, collateral=False):
        """This rank's error (its first line) for the next attempt's account; the first one counts."""
        if self.directory is None or not os.path.isdir(self.save):  # a start-up error makes no --save
            return
        rank = os.environ.get("RANK", "0")
        path = os.path.join(self.directory, "errors", f"{self.run_id}-{self.attempt}-{rank}.json")
        if os.path.exists(path):
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_text(path, json.dumps({"time": time.time(), "line": line, "collateral": collateral}))
        except OSError:
            pass  # a full disk: the error itself is what the user sees


def record_exception(err):
    """The error a rank ends with (main's caller): an exception's first line, a non-zero exit code."""
    state = RunState._current
    if state is None or isinstance(err, KeyboardInterrupt):
        return
    if isinstance(err, SystemExit):
        if err.code in (None, 0, NO_PROGRESS_EXIT):
            return
        line = err.code if isinstance(err.code, str) else f"exited with code {err.code}"
    else:
        line = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    collateral = _COLLATERAL.search(str(err)) is not None or type(err).__name__ in ("DistNetworkError",)
    state.record_error(line[:500], collateral)


def record_error(line):
    """A line the run stops with (a non-finite loss, a hang), for the next attempt's account."""
    if RunState._current is not None:
        RunState._current.record_error(line)


def attempt_store(timeout_minutes):
    """The store a restarted attempt's process group is made with (Megatron's pretrain(store=)), or
    None (torch's default). torchrun's c10d rendezvous keeps one store for the whole job, and the
    workers' process groups write their addresses under the same keys in every attempt: a restarted
    attempt would read the dead attempt's and fail to connect. Its keys go under the attempt."""
    attempt = _attempt()
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    from torch.distributed import PrefixStore, TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(minutes=timeout_minutes))
    return PrefixStore(f"sed_megatron/attempt_{attempt}", store)


class LoopSupervisor:
    """What runs beside Megatron's training loop for unattended runs (training/hooks.py calls it):
    the restart's account and progress.json (RunState), the hang watchdog, the test faults."""

    def __init__(self, state, watchdog, faults=None, metrics_log=None):
        self.state, self.watchdog, self.faults, self.metrics_log = state, watchdog, faults, metrics_log

    def started(self, iteration, writes_metrics, forward_step):
        """The loop starts after `iteration`; returns the forward step to train with."""
        self.state.loop_started(iteration, writes_metrics, self.metrics_log)
        self.watchdog.start(iteration)
        return self.faults.wrap(forward_step) if self.faults is not None else forward_step

    def iteration_done(self, iteration):
        self.watchdog.progress(iteration)
        self.state.iteration_done(iteration)

    def paused(self):
        """A context in which the loop is not expected to finish iterations (a save, an evaluation)."""
        return self.watchdog.paused()

    def ended(self):
        self.watchdog.stop()
