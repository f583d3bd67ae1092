"""Hang detection: a daemon thread per rank, while the training loop runs.

    dog = Watchdog(timeout_s=600)      # --hang-timeout-minutes 10
    dog.start(iteration)               # the loop begins after `iteration`
    dog.progress(iteration)            # after each finished iteration
    with dog.paused(): save()          # a checkpoint save is not a hang
    dog.stop()

Every few seconds each rank's thread publishes a heartbeat (a counter) and the rank's last
finished iteration into the job's TCPStore (the rendezvous store torchrun's agent holds:
MASTER_ADDR / MASTER_PORT with TORCHELASTIC_USE_AGENT_STORE; keys under the restart count), and
reads every rank's. A rank whose heartbeat has not changed for the timeout (a SIGSTOPped or
frozen process), or one that finished no iteration for the timeout while not paused (stuck in a
collective or a kernel), ends the job: the lowest rank whose heartbeat is alive prints one line,
"rank R stopped making progress after iteration N (no heartbeat for T s)", and exits with
HANG_EXIT, after a SIGKILL to a silent rank's process on its own host (a frozen process does not
take torchrun's SIGTERM: torchrun would wait 30 s); torchrun then restarts the workers
(launch/train.sh). Times are measured on each
checker's own clock (when it saw a value change), so clocks of different nodes need not agree.
"""

import contextlib
import os
import socket
import sys
import threading
import time

HANG_EXIT = 6
PREFIX = "sed_megatron_watchdog"


def _store():
    """A client of the job's store (torchrun's agent's), or None outside such a world."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not os.environ.get("MASTER_PORT"):
        return None
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(seconds=60))


class Watchdog:
    def __init__(self, timeout_s, rank=None, world_size=None, prog="sed_megatron.train", on_hang=None,
                 store_factory=_store, interval_s=None):
        self.timeout_s = float(timeout_s)
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        self.prog = prog
        self.on_hang = on_hang
        """on_hang(line): what the lowest live rank does (default: print the line, record it, os._exit(HANG_EXIT))."""
        self._store_factory = store_factory
        # A beat every few seconds; a large world reads every rank's keys less often.
        self.interval_s = interval_s or min(max(2.0, self.world_size / 50), max(0.5, self.timeout_s / 4))
        from .resume import job_attempt

        self._prefix = f"{PREFIX}/{job_attempt()}"
        self._iteration = 0
        self._paused = 0
        self._beats = 0
        self._pauses = 0
        self._stopped = threading.Event()
        self._wake = threading.Event()
        self._thread = None
        self._store = None

    @property
    def enabled(self):
        return self.timeout_s > 0

    def start(self, iteration):
        if not self.enabled:
            return
        self._iteration = int(iteration)
        self._thread = threading.Thread(target=self._run, name="sed_megatron-watchdog", daemon=True)
        self._thread.start()

    def progress(self, iteration):
        self._iteration = int(iteration)
        self._wake.set()  # published now: a rank that freezes next is named with its last iteration

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._pauses += 1  # the others' progress clocks for this rank restart after the pause

    def stop(self):
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _value(self):
        return f"{self._beats}:{self._iteration}:{int(self._paused > 0)}:{self._pauses}"

    def _run(self):
        try:
            store = self._store_factory()
        except Exception as err:  # noqa: BLE001 - no store: this rank still watches its own progress
            print(f"{self.prog}: warning: the hang watchdog cannot reach the job's store ({err}); it watches this "
                  f"rank only", file=sys.stderr, flush=True)
            store = None
        keys = [f"{self._prefix}/{r}" for r in range(self.world_size)]
        self._store = store
        if store is not None:
            try:  # where this rank runs: the rank that ends the job kills a frozen one on its own host
                store.set(f"{keys[self.rank]}/where", f"{socket.gethostname()} {os.getpid()}")
            except Exception:  # noqa: BLE001 - the store went away: the job is ending anyway
                return
        seen = {}  # rank -> (published value, when the heartbeat changed, when the rank last made progress)
        next_check = time.monotonic() + self.interval_s
        while True:
            self._wake.wait(max(0.0, next_check - time.monotonic()))
            self._wake.clear()
            if self._stopped.is_set():
                break
            self._beats += 1
            now = time.monotonic()
            try:
                if store is not None:
                    store.set(keys[self.rank], self._value())
                if now < next_check:  # woken by progress: published, the others are read on schedule
                    continue
                next_check = now + self.interval_s
                if store is None:
                    values = {self.rank: self._value()}
                else:
                    present = [r for r in range(self.world_size) if store.check([keys[r]])]
                    values = dict(zip(present, (v.decode() for v in store.multi_get([keys[r] for r in present]))))
            except Exception:  # noqa: BLE001 - the store went away: the job is ending anyway
                return
            for rank, text in values.items():
                if text == "done":  # its loop ended
                    seen.pop(rank, None)
                    continue
                beat, iteration, paused, pauses = (int(x) for x in text.split(":"))
                old = seen.get(rank)
                if old is None:
                    seen[rank] = ((beat, iteration, paused, pauses), now, now)
                    continue
                (old_beat, old_iteration, _, old_pauses), beat_at, progress_at = old
                moved = iteration != old_iteration or paused or pauses != old_pauses
                seen[rank] = ((beat, iteration, paused, pauses), now if beat != old_beat else beat_at,
                              now if moved else progress_at)
            if self._stopped.is_set():
                break
            self._check(seen, now)
        if store is not None:
            try:
                store.set(keys[self.rank], "done")
            except Exception:  # noqa: BLE001
                pass

    def _check(self, seen, now):
        silent = {r: now - s[1] for r, s in seen.items() if now - s[1] > self.timeout_s}
        stuck = {r: now - s[2] for r, s in seen.items() if now - s[2] > self.timeout_s and r not in silent}
        if not silent and not stuck:
            return
        live = [r for r in seen if r not in silent]
        if not live or min(live) != self.rank:
            return  # the lowest live rank speaks for the job
        if silent:
            rank = min(silent, key=lambda r: (seen[r][0][1], r))
            line = (f"rank {rank} stopped making progress after iteration {seen[rank][0][1]} (no heartbeat for "
                    f"{silent[rank]:.0f} s)")
        else:  # every heartbeat alive: the rank furthest behind is the one the others wait for
            rank = min(stuck, key=lambda r: (seen[r][0][1], r))
            line = (f"rank {rank} stopped making progress after iteration {seen[rank][0][1]} (no iteration finished "
                    f"for {stuck[rank]:.0f} s; its heartbeat is alive)")
        self._stopped.set()
        if self.on_hang is not None:
            self.on_hang(line)
        else:
            self._end_job(line, sorted(silent))

    def _kill_if_local(self, rank):
        """SIGKILL a silent rank's process when it runs on this host (torchrun would wait 30 s for a
        frozen process to take its SIGTERM); its pid, or None."""
        import signal

        try:
            key = f"{self._prefix}/{rank}/where"
            if self._store is None or not self._store.check([key]):
                return None
            host, pid = self._store.get(key).decode().split()
            if host != socket.gethostname():
                return None
            with open(f"/proc/{pid}/environ", "rb") as f:  # still that rank's process (not a reused pid)
                if f"RANK={rank}".encode() not in f.read().split(b"\0"):
                    return None
            os.kill(int(pid), signal.SIGKILL)
            return int(pid)
        except (OSError, ValueError):
            return None

    def _end_job(self, line, silent=()):
        from .resume import record_error

        killed = [pid for pid in map(self._kill_if_local, silent) if pid is not None]
        note = f"; killed its frozen process (pid {', '.join(map(str, killed))}) on this host" if killed else ""
        print(f"{self.prog}: error: {line}; --hang-timeout-minutes {self.timeout_s / 60:g}; ending the job "
              f"(torchrun restarts it while restarts remain){note}", file=sys.stderr, flush=True)
        record_error(line)
        sys.stdout.flush()
        os._exit(HANG_EXIT)
