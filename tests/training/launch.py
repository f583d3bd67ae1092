"""Run `torchrun -m sed_megatron.train` from a test and read back its metrics.jsonl.

One process: `python -m sed_megatron.train` without torchrun (the entry point sets up a world of
one process itself), which spares the torchrun agent's start-up."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny_cpu.yaml")
# The tiny example for tests: every iteration logged, no evaluation, constant LR.
TEST_FLAGS = ["--log-interval", "1", "--eval-iters", "0", "--save-interval", "100000",
              "--lr-warmup-iters", "0", "--lr-decay-style", "constant"]  # LR independent of --train-iters


def _command(nproc, flags, config, torchrun=False):
    if nproc == 1 and not torchrun:  # the flags must say TP x PP x CP = 1, or the entry point starts more
        return [sys.executable, "-m", "sed_megatron.train", "--config", config, *TEST_FLAGS, *flags]
    return [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(nproc), "--standalone",
            "-m", "sed_megatron.train", "--config", config, *TEST_FLAGS, *flags]


def _own_save(flags, config, run_dir):
    """The tiny example saves into the checkout's runs/tiny_cpu, and a run resumes from the newest
    checkpoint in its --save: a test's run of it saves into its own directory instead."""
    if config == TINY and "--save" not in flags:
        return [*flags, "--save", os.path.join(run_dir, "save")]
    return list(flags)


def _env():
    # Eager mode: torch.compile's warm-up costs more than these tiny runs.
    return {**os.environ, "TORCHDYNAMO_DISABLE": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": "1"}


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def train(run_dir, nproc=1, flags=(), config=TINY, timeout=300, torchrun=False):
    """Train to completion; returns the metrics records. Fails the test with the log on error.

    The ranks are forked from a process that has imported the training code (tests/warm.py),
    with torchrun's variables; torchrun=True: under torchrun itself (the GPU checks)."""
    os.makedirs(run_dir, exist_ok=True)
    flags = _own_save(flags, config, run_dir)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    log_path = os.path.join(run_dir, "train.log")
    open(log_path, "w").close()
    if torchrun:
        with open(log_path, "w") as log:
            returncode = subprocess.run(_command(nproc, ["--metrics-file", metrics, *flags], config, torchrun),
                                        cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                        timeout=timeout).returncode
    else:
        from tests import warm

        returncode = warm.run("sed_megatron.train", ["--config", config, *TEST_FLAGS, "--metrics-file", metrics, *flags],
                              env=_env(), cwd=REPO, log=log_path, nproc=nproc, timeout=timeout)
    if returncode != 0:
        with open(log_path) as log:
            pytest.fail(f"training exited with {returncode}:\n{log.read()[-6000:]}")
    return read_metrics(metrics)


def train_until_sigterm(run_dir, nproc, flags, after_records, timeout=300):
    """Start training, send SIGTERM once metrics.jsonl has after_records lines; returns (rc, log)."""
    os.makedirs(run_dir, exist_ok=True)
    flags = _own_save(flags, TINY, run_dir)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    log_path = os.path.join(run_dir, "train.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_command(nproc, ["--metrics-file", metrics, *flags], TINY),
                                cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and len(read_metrics(metrics)) >= after_records:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        rc = proc.wait(timeout=timeout)
    with open(log_path) as log:
        return rc, log.read()
