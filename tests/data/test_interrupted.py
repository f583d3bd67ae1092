"""Preprocessing killed (kill -9) in the middle of a multi-shard run on two workers leaves nothing at its
output prefix, its workers die with it, and the same command again resumes: it reuses the shards
finished before the kill and writes the bytes of an uninterrupted run."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from sed_megatron.data.sft_preprocess import PreprocessConfig, preprocess
from sed_megatron.testing.tiny_hf import make_tokenizer
from tests import warm

pytestmark = pytest.mark.e2e
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "preprocess_sft_data.py")
SHARDS, ROWS = 6, 1000
"""Shards of fewer rows than a unit (1024): one unit each, about a second of a worker on the dev machine."""


def test_preprocess_killed_mid_run_resumes_to_the_uninterrupted_output(tmp_path):
    tokenizer = str(tmp_path / "tok")
    make_tokenizer(tokenizer, ["hello", "hi", "there"])
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(SHARDS):
        with open(shards / f"train-{shard:05d}.jsonl", "w") as f:
            for i in range(ROWS):
                f.write(json.dumps({"prompt": "hello there", "response": " ".join(["hi"] * ((i + shard) % 7 + 1))}))
                f.write("\n")
    out = tmp_path / "out"
    work = out / "ds.parts"
    argv = ["--input", str(shards), "--tokenizer", tokenizer, "--output-prefix", str(out / "ds"), "--quiet"]
    proc = subprocess.Popen([sys.executable, TOOL, *argv, "--workers", "2"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers = []
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if glob.glob(str(work / "*.json")):  # a shard is done
            workers = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed: make the input larger"
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert len(workers) >= 2 and not alive  # the workers died with it (PR_SET_PDEATHSIG)
    assert os.listdir(out) == ["ds.parts"]  # nothing at the prefix
    finished = len(glob.glob(str(work / "*.json")))
    assert 1 <= finished < SHARDS

    again = warm.capture(TOOL, argv)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"preprocess_sft_data.py: resuming from {work}: {finished} of {SHARDS} unit(s) done " in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["samples"] == SHARDS * ROWS
    preprocess(PreprocessConfig(input=str(shards), tokenizer=tokenizer, output_prefix=str(tmp_path / "ref" / "ds")),
               progress=False)
    for name in ("ds.bin", "ds.idx", "ds_loss_mask.bin", "ds_loss_mask.idx"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert sorted(os.listdir(out)) == ["ds.bin", "ds.idx", "ds_loss_mask.bin", "ds_loss_mask.idx"]
