"""Unattended runs under launch/train.sh (torchrun's agent, c10d rendezvous, restarts): a worker
killed (kill -9) or frozen (SIGSTOP) between two saves, the job restarts by itself, resumes from
the newest checkpoint in --save and ends with the weights of an uninterrupted run, bit for bit,
and one curve in metrics.jsonl. Faults come from --inject-fault (testing only). The stop of a
restart that would not make progress is checked in-process (test_unattended.py)."""

import os
import re
import socket
import subprocess
import sys

import pytest

from tests import warm

from .launch import REPO, TINY, _env, read_metrics

# Whole processes (torchrun's agents): the second phase of launch/run_tests.sh.
pytestmark = pytest.mark.e2e

ITERS = 8
FLAGS = ["--config", TINY, "--train-iters", str(ITERS), "--save-interval", "3", "--log-interval", "1",
         "--eval-iters", "0", "--lr-warmup-iters", "0", "--lr-decay-style", "constant"]
HANG_MINUTES = 0.2  # 12 s
HANG_MARGIN_S = 20  # the heartbeat's period (a few s) and a loaded machine's delays beside it
STOP_LINE = re.compile(r"error: rank (\d+) stopped making progress after iteration (\d+) \(no heartbeat for (\d+) s\)")


def _port():
    """A port for the c10d rendezvous of two agents (the first binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_sh(save, flags, log, nnodes=1, nproc=2, port=0, restarts=3):
    """launch/train.sh on nnodes agents of this host; their exit codes, output in log (appended)."""
    run_id = f"test-{os.getpid()}-{os.path.basename(os.path.dirname(save))}"
    env = {**_env(), "PYTHON_BIN": sys.executable, "NNODES": str(nnodes), "NPROC_PER_NODE": str(nproc),
           "MASTER_PORT": str(port), "MAX_RESTARTS": str(restarts), "RDZV_ID": run_id}
    try:
        with open(log, "a") as out:
            procs = [subprocess.Popen(["bash", "launch/train.sh", *FLAGS, "--save", save, *flags], cwd=REPO,
                                      env=env, stdout=out, stderr=subprocess.STDOUT) for _ in range(nnodes)]
            return [p.wait(timeout=600) for p in procs]
    finally:
        _kill_leftovers(run_id)


def _kill_leftovers(run_id):
    """What a killed worker leaves behind (the process Megatron's checkpoint saves start), found by the job's id."""
    import signal

    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"TORCHELASTIC_RUN_ID={run_id}".encode() in f.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def _tensors(checkpoint, tmp_path):
    """Every tensor of a torch_dist checkpoint (model and optimizer state), whole."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{os.path.basename(os.path.dirname(checkpoint))}.pt"
    dcp_to_torch_save(checkpoint, out)
    return {k: v for k, v in torch.load(out, weights_only=False).items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run without a fault (TP=2, forked ranks)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    save = str(tmp / "ckpt")
    code = warm.run("sed_megatron.train", [*FLAGS, "--save", save], env=_env(), cwd=REPO, log=str(tmp / "log"),
                    nproc=2)
    assert code == 0, (tmp / "log").read_text()[-3000:]
    return {"tensors": _tensors(os.path.join(save, f"iter_{ITERS:07d}"), tmp),
            "loss": [r["loss"] for r in read_metrics(os.path.join(save, "metrics.jsonl"))]}


def _check_one_curve_and_weights(save, uninterrupted, tmp_path, restarts, log):
    records = read_metrics(os.path.join(save, "metrics.jsonl"))
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1)), log
    assert [r["loss"] for r in records] == uninterrupted["loss"]
    marked = {r["iteration"]: r["restart"] for r in records if "restart" in r}
    assert {i: {k: v for k, v in m.items() if k != "down_s"} for i, m in marked.items()} == restarts
    assert all(m["down_s"] > 0 for m in marked.values())
    tensors = _tensors(os.path.join(save, f"iter_{ITERS:07d}"), tmp_path)
    assert sorted(tensors) == sorted(uninterrupted["tensors"]) and len(tensors) > 20  # weights and Adam moments
    different = [k for k, v in tensors.items() if not v.equal(uninterrupted["tensors"][k])]
    assert different == []


def test_kill_9_of_a_worker_restarts_and_resumes_bit_identical(uninterrupted, tmp_path):
    """TP=2 on one node: rank 1 is SIGKILLed as it starts iteration 5 (the checkpoint of 3 is the newest)."""
    save, log = str(tmp_path / "ckpt"), tmp_path / "log"
    assert _train_sh(save, ["--inject-fault", "5:kill:1"], log) == [0]
    text = log.read_text()
    assert "exitcode: -9" in text and "sed_megatron.train: restart 1: iteration 5 failed (killed by a signal " \
        f"(no error recorded)); resuming from iteration 3 in {save}, 1 finished iteration(s) lost" in text, text[-5000:]
    # Its own checkpoint, iteration and all (not a fine-tuning start at 0).
    assert re.search(rf"successfully loaded checkpoint from {re.escape(save)} \[.*\] at iteration 3\n", text), text
    _check_one_curve_and_weights(save, uninterrupted, tmp_path,
                                 {4: {"count": 1, "resumed_from": 3, "iterations_lost": 1}}, text[-5000:])


def test_sigstop_of_a_rank_on_two_agents_ends_the_attempt_and_restarts(uninterrupted, tmp_path):
    """Two torchrun agents on this host (NNODES=2, one rank each), c10d rendezvous: global rank 0
    is SIGSTOPped as it starts iteration 5; rank 1 names it after the hang timeout and exits 6;
    both agents restart their workers, which resume from iteration 3 and finish."""
    save, log = str(tmp_path / "ckpt"), tmp_path / "log"
    codes = _train_sh(save, ["--inject-fault", "5:stop:0", "--hang-timeout-minutes", str(HANG_MINUTES)], log,
                      nnodes=2, nproc=1, port=_port())
    text = log.read_text()
    assert codes == [0, 0], text[-5000:]
    stops = STOP_LINE.findall(text)
    assert [(rank, iteration) for rank, iteration, _ in stops] == [("0", "4")], text[-5000:]
    silent_s = int(stops[0][2])
    assert HANG_MINUTES * 60 <= silent_s <= HANG_MINUTES * 60 + HANG_MARGIN_S
    assert "killed its frozen process (pid " in text  # on this host: no wait for torchrun's SIGTERM grace
    assert "exitcode: 6" in text and "restart 1: iteration 5 failed (rank 0 stopped making progress" in text
    _check_one_curve_and_weights(save, uninterrupted, tmp_path,
                                 {4: {"count": 1, "resumed_from": 3, "iterations_lost": 1}}, text[-5000:])
