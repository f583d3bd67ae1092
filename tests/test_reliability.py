"""docs/RELIABILITY.md is what the entry points do: every case runs again and the table must match.

Regenerate after an intended change: python -m tests.reliability --write docs/RELIABILITY.md
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "RELIABILITY.md")


def test_every_bad_input_and_fault_is_as_documented(tmp_path):
    out = str(tmp_path / "reliability.md")
    # A process of its own: the cases apply the CPU layer and set Megatron's global arguments.
    run = subprocess.run([sys.executable, "-m", "tests.reliability", "--out", out], cwd=REPO, capture_output=True,
                         text=True, timeout=900,
                         env={**os.environ, "TORCHDYNAMO_DISABLE": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    with open(out + ".json") as f:
        problems = json.load(f)
    assert problems == [], "\n".join(problems)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out) as f, open(DOC) as g:
        generated, documented = f.read(), g.read()
    assert generated.count("\n| ") >= 40  # rows
    assert generated == documented, "docs/RELIABILITY.md is stale: python -m tests.reliability --write docs/RELIABILITY.md"
