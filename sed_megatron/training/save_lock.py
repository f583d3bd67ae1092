"""One run at a time writes a --save directory: a lock file, <save>/.sed_megatron.lock.

    lock = SaveLock.acquire(save)      # global rank 0, at start; SaveDirBusy (one line) if a live run holds it
    ...
    lock.release()                     # at the end (any exit that is not a kill)

The lock (JSON: host, pid, the pid's start time, run id, started) is created whole or not at
all (written beside it, then hard-linked into place: the link fails when one exists, like
O_EXCL, and no reader sees it half-written). Its pid is the process that owns the job: under
torchrun's agent the agent (os.getppid()), so that the workers it restarts find the lock theirs;
otherwise the rank itself. A lock with the same torchrun run id (TORCHELASTIC_RUN_ID, when it
is not "none") is ours too: a restart on another node.

A lock is a dead run's, and is taken over with a message, when: on this host, its pid is gone
(or is another process now: its start time differs); on another host, its heartbeat stopped
(rank 0 touches the file every HEARTBEAT_S seconds; older than STALE_AFTER_S it is dead).
"""

import datetime
import json
import os
import socket
import threading
import time

LOCK_FILE = ".sed_megatron.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
"""A lock on another host whose file was not touched for this long belongs to a dead run."""
HELD_ENV = "SED_MEGATRON_SAVE_LOCK_HELD"
"""Set by sed_megatron.train for the ranks it starts itself: the launcher holds the lock."""


class SaveDirBusy(RuntimeError):
    """Another live run writes this --save; the message is one line naming it (host, pid)."""


def _process_start(pid):
    """(state, start time in clock ticks since boot) of pid from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _start(pid):
    stat = _process_start(pid)
    return stat[1] if stat else None


def _alive(pid, start):
    """Whether pid runs on this host and is the process that started at `start` (None: unknown)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    stat = _process_start(pid)
    if stat is None:
        return not os.path.isdir("/proc")  # no procfs: os.kill is all there is
    state, now = stat
    return state != "Z" and (start is None or now == start)  # a zombie has exited; another start: pid reused


def run_id():
    value = os.environ.get("TORCHELASTIC_RUN_ID")
    return value if value and value != "none" else None


def owner_pid():
    """The process that owns the job: torchrun's agent for its workers (restarts keep it), else this one."""
    return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()


def _record():
    pid = owner_pid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _start(pid), "run_id": run_id(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "writer": os.getpid()}


def _describe(record):
    return f"host {record.get('host')}, pid {record.get('pid')}, started {record.get('started')}"


def judge(record, mtime, now=None, host=None):
    """What a lock found in place is: "ours" (this job, e.g. a worker restarted by torchrun), "live"
    (another run), "unreadable" (just created: look again) or "dead: <why>"."""
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    if not isinstance(record, dict):  # being written (O_EXCL without links), or garbage once it is old
        return "dead: the lock file is not readable JSON" if now - mtime > 2 * HEARTBEAT_S else "unreadable"
    if record.get("run_id") and record.get("run_id") == run_id():
        return "ours"
    if record.get("host") == host:
        pid = record.get("pid")
        if not isinstance(pid, int):
            return "dead: the lock names no pid"
        if not _alive(pid, record.get("pid_start")):
            return f"dead: pid {pid} is not running"
        mine = owner_pid()
        return "ours" if pid == mine and record.get("pid_start") == _start(mine) else "live"
    if now - mtime > STALE_AFTER_S:
        return f"dead: its heartbeat stopped {now - mtime:.0f} s ago"
    return "live"


def _read(path):
    """(record or None when unreadable, mtime); FileNotFoundError when it is gone."""
    mtime = os.stat(path).st_mtime
    try:
        with open(path) as f:
            return json.load(f), mtime
    except ValueError:
        return None, mtime


class SaveLock:
    def __init__(self, path, record, created_dir, notice):
        self.path, self.record, self.created_dir, self.notice = path, record, created_dir, notice
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sed-megatron-save-lock", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, save):
        """The lock of `save` for this run (the directory made if needed); its `notice` says when it
        took over a dead run's lock. SaveDirBusy when a live run holds it."""
        created = not os.path.isdir(save)
        os.makedirs(save, exist_ok=True)
        path = os.path.join(save, LOCK_FILE)
        record, notice = _record(), None
        for _ in range(5):
            if _create(path, record):
                return cls(path, record, created, notice)
            try:
                other, mtime = _read(path)
            except FileNotFoundError:
                continue  # released meanwhile
            verdict = judge(other, mtime)
            if verdict == "unreadable":
                time.sleep(0.5)
                continue
            if verdict == "live":
                raise SaveDirBusy(f"--save {save} is being written by another run ({_describe(other)}; its lock: "
                                  f"{path}): stop it or choose another --save (a lock left by a run that is gone is "
                                  f"taken over by itself)")
            if verdict == "ours":
                _replace(path, record)  # a restart of this job: the lock stays, now this worker's
                return cls(path, record, created, None)
            stale = f"{path}.stale-{os.getpid()}"
            try:
                os.rename(path, stale)  # one of two runs taking it over at once wins the rename
            except FileNotFoundError:
                continue
            try:
                moved, _ = _read(stale)
            except FileNotFoundError:
                moved = None
            if moved != other:  # another run's fresh lock was in place by then: put it back
                try:
                    os.link(stale, path)
                except FileExistsError:
                    pass
                os.remove(stale)
                continue
            os.remove(stale)
            who = _describe(other) if isinstance(other, dict) else "unknown"
            notice = f"took over the lock {path} of a run that is gone ({who}; {verdict[len('dead: '):]})"
        raise SaveDirBusy(f"--save {save}: could not take its lock {path} (other runs keep taking it, or it is "
                          f"unreadable and younger than {2 * HEARTBEAT_S:.0f} s)")

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self):
        """Stop the heartbeat and remove the lock if it is still this run's; the directory too when
        this run made it and left it empty (a run stopped by a bad input leaves nothing)."""
        self._stop.set()
        try:
            current, _ = _read(self.path)
        except FileNotFoundError:
            current = None
        if current == self.record:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        if self.created_dir:
            try:
                os.rmdir(os.path.dirname(self.path))
            except OSError:
                pass  # not empty: the run wrote there


def _tmp(path):
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def _write(path, record):
    with open(path, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())


def _create(path, record):
    """Put a lock in place unless one is there (atomically: linked in whole); whether it did."""
    tmp = _tmp(path)
    _write(tmp, record)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: O_EXCL (a reader may see it empty for a moment)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return True
    finally:
        os.remove(tmp)


def _replace(path, record):
    tmp = _tmp(path)
    _write(tmp, record)
    os.replace(tmp, path)
