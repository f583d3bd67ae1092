"""Unattended runs, in-process: resume by default, the restart account and its stop without
progress, the hang watchdog (with a store of its own), the test faults, the flags.
(The whole-process proofs: test_restart.py.)"""

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest

from sed_megatron.training import resume
from sed_megatron.training.faults import Fault, FaultInjection, InjectedFault
from sed_megatron.training.watchdog import Watchdog


def _save(tmp_path, iteration=None):
    save = tmp_path / "ckpt"
    save.mkdir(exist_ok=True)
    if iteration is not None:
        (save / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return str(save)


def test_resume_only_from_a_save_with_a_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    empty = _save(tmp_path)
    flags = SimpleNamespace(save=empty, load="base", resume=True)
    assert resume.resume_dir(flags) is None and resume.resumed_argv(["--x"], flags, "p") == ["--x"]
    save = _save(tmp_path, 6)
    assert resume.resumed_argv(["--x"], flags, "p") == ["--x", "--load", save]
    assert f"p: resuming from the newest checkpoint in {save} (iteration 6) (base is not loaded again)" in \
        capsys.readouterr().out
    assert resume.resume_dir(SimpleNamespace(save=save, load=None, resume=False)) is None  # --no-resume
    # The parsed flags of the resumed run: its own checkpoint, optimizer and RNG included.
    parsed = SimpleNamespace(save=save, load=save, resume=True, finetune=True, no_load_optim=True, no_load_rng=True)
    resume.adjust_for_resume(parsed)
    assert (parsed.finetune, parsed.no_load_optim, parsed.no_load_rng) == (False, False, False)
    other = SimpleNamespace(save=save, load="base", resume=False, finetune=True, no_load_optim=True, no_load_rng=True)
    resume.adjust_for_resume(other)  # --no-resume: the flags as given
    assert other.finetune and other.no_load_optim


def _attempt(monkeypatch, save, attempt, prog="p"):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))  # one agent: its count is the job's attempt
    monkeypatch.setattr(resume, "_ATTEMPT", [])
    monkeypatch.setenv("RANK", "0")
    return resume.RunState.at_start(save, prog)


def _fail(state, iteration, line=None, collateral=None):
    """An attempt that finished `iteration` and then failed (line: its first error)."""
    state.loop_started(0, True)
    state.iteration_done(iteration)
    if collateral:
        state.record_error(collateral, collateral=True)
    if line:
        time.sleep(0.01)
        state.record_error(line)


def test_restarts_are_accounted_and_stop_without_progress(tmp_path, monkeypatch, capsys):
    save = _save(tmp_path, 3)
    _fail(_attempt(monkeypatch, save, 0), 5, collateral="RuntimeError: Connection reset by peer")
    state = _attempt(monkeypatch, save, 1)  # iteration 6 failed; only a collective's error was recorded
    assert state.restart["failed_at"] == 6 and state.restart["error"] == resume.UNRECORDED
    assert state.restart["iterations_lost"] == 2 and state.restart["resumed_from"] == 3
    out = capsys.readouterr().out
    assert "p: restart 1: iteration 6 failed (killed by a signal (no error recorded)); resuming from iteration 3" in out
    _fail(state, 7, "InjectedFault: at 8")  # progress: iteration 8 fails next
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("6")
    state = _attempt(monkeypatch, save, 2)
    assert state.restart["failed_at"] == 8 and state.restart["error"] == "InjectedFault: at 8"
    _fail(state, 7, "ValueError: again at 8", collateral="RuntimeError: Connection closed by peer")
    capsys.readouterr()
    for attempt in (3, 4):  # iteration 8 failed in attempts 1 and 2: each later attempt stops at once
        with pytest.raises(SystemExit) as stop:
            _attempt(monkeypatch, save, attempt)
        assert stop.value.code == resume.NO_PROGRESS_EXIT
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == ["p: error: no progress: iteration 8 failed in the last two attempts (first error: "
                         f"InjectedFault: at 8); not restarting again (the newest checkpoint in {save}: iteration 6)"]
    records = json.loads((tmp_path / "ckpt" / ".run" / "restarts.json").read_text())
    assert [(r["attempt"], r["failed_at"]) for r in records] == [(0, 6), (1, 8), (2, 8), (3, 8)]
    # A new job (attempt 0) starts a new account.
    _attempt(monkeypatch, save, 0)
    assert not os.path.exists(tmp_path / "ckpt" / ".run" / "restarts.json")


def test_the_first_record_after_a_restart_carries_it(tmp_path, monkeypatch):
    from sed_megatron.training.metrics import MetricsLog

    save = _save(tmp_path, 2)
    _fail(_attempt(monkeypatch, save, 0), 3)
    state = _attempt(monkeypatch, save, 1)
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), tokens_per_iteration=8)
    log.start(2)
    state.loop_started(2, True, log)
    for iteration in (3, 4):
        log.add({"lm loss": 1.0}, False)
        log.write(iteration, 0.1, 1.0)
    first, second = (json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert first["restart"]["count"] == 1 and first["restart"]["resumed_from"] == 2
    assert first["restart"]["iterations_lost"] == 1 and first["restart"]["down_s"] >= 0
    assert first["loss"] == 1.0 and "restart" not in second


def test_record_exception_keeps_the_first_line(tmp_path, monkeypatch):
    save = _save(tmp_path)
    state = _attempt(monkeypatch, save, 0)
    resume.record_exception(SystemExit(0))
    resume.record_exception(InjectedFault("boom\nmore"))
    resume.record_exception(ValueError("later"))  # the first error of a rank counts
    assert state.first_error(0) == "InjectedFault: boom"


class DictStore:
    """The three TCPStore calls the watchdog makes, shared by the threads of one test."""

    def __init__(self):
        self.data, self.lock = {}, threading.Lock()

    def set(self, key, value):
        with self.lock:
            self.data[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        with self.lock:
            return all(k in self.data for k in keys)

    def multi_get(self, keys):
        with self.lock:
            return [self.data[k] for k in keys]


def _dogs(store, hangs, n=2, timeout_s=0.6):
    return [Watchdog(timeout_s, rank=r, world_size=n, on_hang=lambda line, r=r: hangs.append((r, line)),
                     store_factory=lambda: store, interval_s=0.05) for r in range(n)]


def _wait(hangs, seconds=20):
    deadline = time.monotonic() + seconds
    while not hangs and time.monotonic() < deadline:
        time.sleep(0.05)


def test_watchdog_names_a_silent_rank_from_the_lowest_live_one(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setattr(resume, "_ATTEMPT", [])
    store, hangs = DictStore(), []
    frozen, alive = _dogs(store, hangs)
    frozen.start(3)
    alive.start(3)
    time.sleep(0.2)
    frozen._stopped.set()  # frozen: its thread ends without a word (as a SIGSTOPped process's)
    frozen._wake.set()
    frozen._thread.join()
    store.set(f"{frozen._prefix}/0", "9:4:0:0")  # its last beat: after iteration 4
    _wait(hangs)
    alive.stop()
    assert len(hangs) == 1 and hangs[0][0] == 1, hangs
    assert hangs[0][1].startswith("rank 0 stopped making progress after iteration 4 (no heartbeat for ")


def test_watchdog_names_a_rank_without_progress_and_pauses_for_saves(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setattr(resume, "_ATTEMPT", [])
    store, hangs = DictStore(), []
    dogs = _dogs(store, hangs)
    for dog in dogs:
        dog.start(0)
    with dogs[0].paused(), dogs[1].paused():  # a save twice as long as the timeout
        time.sleep(1.2)
    assert hangs == []
    for iteration in range(1, 40):  # rank 1 finishes iteration 1, then waits for rank 0 forever
        dogs[0].progress(min(iteration, 1))
        dogs[1].progress(iteration)
        time.sleep(0.05)
        if hangs:
            break
    _wait(hangs)
    for dog in dogs:
        dog.stop()
    assert hangs[0] == (0, hangs[0][1]) and hangs[0][1].startswith(
        "rank 0 stopped making progress after iteration 1 (no iteration finished for "), hangs
    assert hangs[0][1].endswith("its heartbeat is alive)")


def test_faults_strike_one_rank_in_one_attempt(monkeypatch):
    assert Fault.parse("5:kill") == Fault(5, "kill", 0, 0)
    assert Fault.parse("8:stop:1:all") == Fault(8, "stop", 1, None)
    for bad in ("5", "x:kill", "5:explode", "5:kill:r", "5:kill:1:often"):
        with pytest.raises(ValueError, match="expected ITERATION:kill|stop|raise"):
            Fault.parse(bad)
    clock = [1]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setattr(resume, "_ATTEMPT", [])
    step = FaultInjection(["2:raise:1:1", "3:raise:1:0", "2:kill:0"], lambda: clock[0]).wrap(lambda: "step")
    assert step() == "step"
    clock[0] = 3  # attempt 0's fault: not in this attempt
    assert step() == "step"
    clock[0] = 2
    with pytest.raises(InjectedFault, match="injected fault at iteration 2 on rank 1"):
        step()


def test_flags_and_yaml(tmp_path):
    from sed_megatron.runtime import prepare
    from sed_megatron.training.arguments import add_sed_arguments, expand_config
    from sed_megatron.training.parse import parse_flags
    from sed_megatron.world import megatron_parser

    config = tmp_path / "run.yaml"
    config.write_text("resume: false\nhang_timeout_minutes: 2.5\n")
    parser = megatron_parser("p", add_sed_arguments)
    assert expand_config(["--config", str(config)], parser)[:3] == ["--no-resume", "--hang-timeout-minutes", "2.5"]
    flags = parse_flags(["--config", str(config)], prepare(training=True))
    assert flags.resume is False and flags.hang_timeout_minutes == 2.5
    assert parse_flags([], prepare(training=True)).resume is True


def test_hang_timeout_sets_the_collectives_timeout(capsys):
    from sed_megatron.training.parse import check_unattended_args

    def flags(**kw):
        return SimpleNamespace(**{"hang_timeout_minutes": 2.5, "distributed_timeout_minutes": 10, "inject_fault": [],
                                  "save": None, "load": None, "resume": True, **kw})

    args = flags()  # one minute past it: the watchdog names the rank first (Megatron parses the flag again)
    assert check_unattended_args(args, []) == ["--distributed-timeout-minutes", "4"]
    assert args.distributed_timeout_minutes == 4
    args = flags(distributed_timeout_minutes=30)
    assert check_unattended_args(args, ["--distributed-timeout-minutes", "30"]) == []
    assert args.distributed_timeout_minutes == 30  # given: it wins
    args = flags(hang_timeout_minutes=0)
    assert check_unattended_args(args, []) == []
    assert args.distributed_timeout_minutes == 10  # off: Megatron's default
    for bad, message in ((flags(hang_timeout_minutes=-1), "--hang-timeout-minutes -1: must be >= 0"),
                         (flags(inject_fault=["3:boom"]), "--inject-fault '3:boom': expected")):
        with pytest.raises(SystemExit) as stop:
            check_unattended_args(bad, [])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_finished_run_started_again_has_nothing_to_train(tmp_path, capsys, monkeypatch):
    from sed_megatron import train
    from sed_megatron.runtime import prepare

    monkeypatch.setenv("RANK", "0")
    save = _save(tmp_path, 6)
    argv = ["--config", "examples/tiny_cpu.yaml", "--save", save]
    assert train._already_trained([*argv, "--train-iters", "6"], prepare(training=True))
    assert (f"the newest checkpoint in {save} is at iteration 6, --train-iters 6: nothing left to train"
            in capsys.readouterr().out)
    assert not train._already_trained([*argv, "--train-iters", "7"], prepare(training=True))  # continues
    assert not train._already_trained([*argv, "--train-iters", "6", "--no-resume"], prepare(training=True))


def test_a_start_up_error_writes_nothing_into_a_new_save(tmp_path, monkeypatch):
    save = str(tmp_path / "new")
    _attempt(monkeypatch, save, 0)
    resume.record_exception(SystemExit(2))
    assert not os.path.exists(save)
