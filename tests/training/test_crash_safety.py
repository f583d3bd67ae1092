"""kill -9 during a checkpoint save, and a save that fails: the tracker always names a complete
checkpoint, and training resumes from it."""

import os
import subprocess
import sys

import pytest

from .launch import REPO, TINY, _env, read_metrics, train

# Whole processes (training, tools): the second phase of launch/run_tests.sh, beside the first.
pytestmark = pytest.mark.e2e

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_driver.py")
FLAGS = ["--config", TINY, "--tensor-model-parallel-size", "1", "--train-iters", "4", "--save-interval", "2",
         "--loss-type", "ce", "--log-interval", "1", "--eval-iters", "0", "--lr-warmup-iters", "0",
         "--lr-decay-style", "constant"]


def tracker(save):
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        return f.read().strip()


def kill_during_save(tmp_path, phase, save, load):
    """The driver: train to iteration 4 (from `load` if given), SIGKILLed during the save of 4
    (forked by tests/warm.py in a session of its own, whose group the driver kills)."""
    from tests import warm

    metrics = tmp_path / f"metrics_{phase}.jsonl"
    log = tmp_path / f"driver_{phase}.log"
    code = warm.run(DRIVER, [phase, "4", "--", *FLAGS, "--save", save, "--metrics-file", str(metrics),
                             *(["--load", load] if load else [])],
                    env={**_env(), "SED_MEGATRON_DEVICE": "cpu"}, cwd=REPO, log=str(log), world=True)
    assert code == -9, log.read_text()[-3000:]
    return [r["iteration"] for r in read_metrics(str(metrics))]


def test_kill_during_a_save_leaves_a_complete_checkpoint(tmp_path):
    """The three kill points in a chain on one checkpoint directory: each killed run but the first
    resumes from what the previous kill left (a partial iteration directory, one without its
    metadata, a tracker written but not in place), and a last run resumes and completes."""
    save = str(tmp_path / "ckpt")
    load = None
    for phase in ("write", "finish", "tracker"):
        iterations = kill_during_save(tmp_path, phase, save, load)
        assert iterations == ([1, 2, 3, 4] if load is None else [3, 4]), phase
        assert tracker(save) == "2", phase  # the save of iteration 4 never completed
        assert os.path.exists(os.path.join(save, "iter_0000002", ".metadata")), phase
        load = save
    # Iterations 3 and 4 from the checkpoint of iteration 2, through the leftovers of the kills.
    records = train(str(tmp_path / "resume"), 1, ["--tensor-model-parallel-size", "1", "--train-iters", "4",
                                                  "--save-interval", "2", "--loss-type", "ce", "--load", save,
                                                  "--save", save, "--lr-warmup-iters", "0",
                                                  "--lr-decay-style", "constant"])
    assert [r["iteration"] for r in records] == [3, 4]
    assert tracker(save) == "4"


def test_a_failing_save_stops_in_one_line(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "iter_0000004").write_text("in the way")  # the save of iteration 4 cannot make its directory
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "1", "--standalone", "-m",
           "sed_megatron.train", *FLAGS, "--save", str(save)]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if "sed_megatron.train: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("sed_megatron.train: error: iteration 4: "), out.stderr[-3000:]
    assert errors[0].endswith(f"(the newest complete checkpoint in {save}: iteration 2)")
    assert tracker(str(save)) == "2"
