"""Preprocessing killed mid-write (kill -9) leaves nothing at its output prefix."""

import json
import os
import signal
import subprocess
import sys
import time

from sed_megatron.testing.tiny_hf import make_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_preprocess_killed_mid_write_leaves_nothing(tmp_path):
    tokenizer = str(tmp_path / "tok")
    make_tokenizer(tokenizer, ["hello", "hi", "there"])
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(200_000):
            f.write(json.dumps({"prompt": "hello there", "response": " ".join(["hi"] * (i % 7 + 1))}) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "preprocess_sft_data.py"), "--input",
                             str(tmp_path / "big.jsonl"), "--tokenizer", tokenizer, "--output-prefix", str(out / "ds"),
                             "--quiet"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(out) and any(".tmp-" in name for name in os.listdir(out)):  # writing has begun
            time.sleep(0.5)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed: make the input larger"
    assert not [name for name in os.listdir(out) if ".tmp-" not in name]  # nothing at the prefix
