"""examples/gsm8k/experiment.py end to end on a GSM8K-shaped stand-in (the real data is not in the repo)."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.e2e  # the second phase of launch/run_tests.sh


def test_experiment_runs_and_resumes(tmp_path):
    data = tmp_path / "gsm8k"
    data.mkdir()
    for split, count in (("train", 24), ("test", 3)):
        with open(data / f"{split}.jsonl", "w") as f:
            for i in range(count):
                a, b = i + 2, 2 * i + 1
                f.write(json.dumps({"question": f"Ann has {a} pens and buys {b} more. How many pens now?",
                                    "answer": f"Ann has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} pens.\n#### {a + b}"})
                        + "\n")
    cmd = [sys.executable, os.path.join(REPO, "examples", "gsm8k", "experiment.py"), "--gsm8k-dir", str(data),
           "--workdir", str(tmp_path / "run"), "--seeds", "0", "1", "--losses", "sed", "--vocab-size", "300",
           "--seq-length", "128", "--base-iters", "3", "--sft-iters", "5", "--eval-prompts", "2", "--num-samples", "2",
           "--max-new-tokens", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("| SED | ") and " ± " in lines[-1]
    with open(tmp_path / "run" / "results.json") as f:
        results = json.load(f)
    assert sorted(results["runs"]) == ["sed_s0", "sed_s1"] and 0 < results["tau"] < 1
    # A second call finds every run done and only prints the table again.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == lines[-1]
    assert not [line for line in again.stdout.splitlines() if re.search(r"_s\d: \d+ s$", line)]  # nothing retrained
