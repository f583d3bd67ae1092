"""The quickstart pipeline end to end, shortened (the full run is launch/quickstart_cpu.sh)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.e2e  # the second phase of launch/run_tests.sh


def test_quickstart_runs_end_to_end(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "quickstart", "quickstart.py"), "--workdir", str(tmp_path / "qs"),
         "--base-iters", "20", "--sft-iters", "10", "--eval-prompts", "3", "--num-samples", "2"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-3].startswith("| CE |") and lines[-2].startswith("| SED |")
    assert (tmp_path / "qs" / "curves.png").stat().st_size > 10_000
