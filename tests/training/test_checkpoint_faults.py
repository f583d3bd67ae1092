"""Whole runs against one checkpoint directory (issue #26, items 3-4): a full disk during a save,
--save-keep-last, a cut checkpoint found before the first step and --load-fallback resuming from
the older one; and the lock of --save (a second run into a live run's directory stops, a killed
run's lock is taken over). What the user sees and what is left on disk, case after case.
One-process runs (about 30 s together): in the first phase of launch/run_tests.sh, which ends
earlier than the end-to-end one."""

import json
import os
import signal
import subprocess
import sys
import time

from sed_megatron.training.checkpoints import checkpoint_problem, iteration_dir, iterations

from .launch import REPO, TEST_FLAGS, TINY, _env, read_metrics

FLAGS = ["--config", TINY, *TEST_FLAGS, "--tensor-model-parallel-size", "1", "--train-iters", "8",
         "--save-interval", "2", "--loss-type", "ce"]
ERROR = "sed_megatron.train: error: "


def run(tmp_path, name, flags):
    """sed_megatron.train as one forked process: (exit code, its output, iterations it logged)."""
    from tests import warm

    log, metrics = tmp_path / f"{name}.log", tmp_path / f"{name}.jsonl"
    code = warm.run("sed_megatron.train", [*FLAGS, "--metrics-file", str(metrics), *flags], env=_env(), cwd=REPO,
                    log=str(log), timeout=300)
    done = [r["iteration"] for r in read_metrics(str(metrics))] if metrics.exists() else []
    return code, log.read_text(), done


def tracker(save):
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        return f.read().strip()


def errors(output):
    return [line for line in output.splitlines() if line.startswith(ERROR)]


def test_full_disk_retention_and_a_cut_checkpoint(tmp_path):
    save = str(tmp_path / "ckpt")
    # 1. The disk fills during the save of iteration 4: exit 4, the tracker on 2, the lock gone.
    code, out, done = run(tmp_path, "enospc", ["--save", save, "--inject-save-error", "4:ENOSPC"])
    assert code == 4 and done == [1, 2, 3, 4], out[-3000:]
    assert errors(out) == [f"{ERROR}iteration 4: OSError: [Errno 28] No space left on device (the newest complete "
                           f"checkpoint in {save}: iteration 2)"], out[-3000:]
    assert tracker(save) == "2"
    assert checkpoint_problem(iteration_dir(save, 4)) == f"{iteration_dir(save, 4)}/.metadata: missing (the save of " \
                                                        f"this checkpoint did not finish)"
    assert not os.path.exists(os.path.join(save, ".sed_megatron.lock"))

    # 2. Resumed with --save-keep-last 2 to iteration 6: 4 is saved over the leftovers, 2 deleted once 6 is complete.
    code, out, done = run(tmp_path, "keep", ["--load", save, "--save", save, "--save-keep-last", "2",
                                             "--exit-interval", "6"])
    assert code == 0 and done == [3, 4, 5, 6], out[-3000:]
    assert f"sed_megatron: --save-keep-last 2: deleted the checkpoints of iteration(s) 2 in {save}" in out
    assert iterations(save) == [4, 6] and tracker(save) == "6"
    assert all(checkpoint_problem(iteration_dir(save, i)) is None for i in (4, 6))

    # 3. The newest checkpoint cut short (a copy that stopped): one line naming the file, before the first step.
    distcp = os.path.join(iteration_dir(save, 6), "__0_0.distcp")
    size = os.path.getsize(distcp)
    with open(distcp, "r+b") as f:
        f.truncate(size // 2)
    code, out, done = run(tmp_path, "cut", ["--load", save, "--save", save])
    assert code == 2 and done == [], out[-3000:]
    assert errors(out) == [f"{ERROR}{distcp}: truncated: {size // 2} of {size} bytes (the checkpoint of iteration 6, "
                           f"which {save}/latest_checkpointed_iteration.txt names); --load-fallback would load "
                           f"iteration 4, the newest complete one in {save}"], out[-3000:]
    assert iterations(save) == [4, 6] and tracker(save) == "6" and os.path.getsize(distcp) == size // 2

    # 4. --load-fallback: iteration 4 is loaded instead (said in the log) and the run goes on from there.
    code, out, done = run(tmp_path, "fallback", ["--load", save, "--save", save, "--load-fallback",
                                                 "--save-keep-last", "2"])
    assert code == 0 and done == [5, 6, 7, 8], out[-3000:]
    assert (f"{distcp}: truncated: {size // 2} of {size} bytes (the checkpoint of iteration 6, which "
            f"{save}/latest_checkpointed_iteration.txt names): loading iteration 4 instead, the newest complete "
            f"checkpoint in {save} (--load-fallback)") in out
    assert "successfully loaded checkpoint from" in out and "at iteration 4" in out
    assert iterations(save) == [6, 8] and tracker(save) == "8"
    assert checkpoint_problem(iteration_dir(save, 6)) is None  # saved again, whole


def test_a_live_run_keeps_its_save_and_a_dead_one_leaves_it(tmp_path):
    import socket

    save = str(tmp_path / "ckpt")
    lock = os.path.join(save, ".sed_megatron.lock")
    metrics = tmp_path / "live.jsonl"
    with open(tmp_path / "live.log", "w") as log:
        live = subprocess.Popen([sys.executable, "-m", "sed_megatron.train", *FLAGS, "--train-iters", "100000",
                                 "--save-interval", "100000", "--save", save, "--metrics-file", str(metrics)],
                                cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not (metrics.exists() and metrics.read_text()) and live.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert live.poll() is None, (tmp_path / "live.log").read_text()[-3000:]
        with open(lock) as f:
            held = json.load(f)
        assert (held["host"], held["pid"]) == (socket.gethostname(), live.pid)
        # A second run into the same --save: one line naming the live one; nothing of it written.
        code, out, done = run(tmp_path, "second", ["--save", save, "--train-iters", "2"])
        assert code == 2 and done == [], out[-3000:]
        assert errors(out) == [f"{ERROR}--save {save} is being written by another run (host {held['host']}, pid "
                               f"{live.pid}, started {held['started']}; its lock: {lock}): stop it or choose another "
                               f"--save (a lock left by a run that is gone is taken over by itself)"], out[-3000:]
        os.kill(live.pid, signal.SIGKILL)
        live.wait(timeout=60)
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    with open(lock) as f:
        assert json.load(f) == held  # the killed run's lock stays
    # The next run takes it over, says so, trains, and removes it at its end.
    code, out, done = run(tmp_path, "after", ["--save", save, "--train-iters", "2", "--save-interval", "2"])
    assert code == 0 and done == [1, 2], out[-3000:]
    assert (f"sed_megatron.train: took over the lock {lock} of a run that is gone (host {held['host']}, pid "
            f"{live.pid}, started {held['started']}; pid {live.pid} is not running)") in out
    assert not os.path.exists(lock) and tracker(save) == "2"
