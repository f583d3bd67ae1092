"""The ranks a tool starts itself (sed_megatron.launch.spawn_workers), as torchrun's agent would."""

import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigterm_to_the_launcher_reaches_every_rank(tmp_path):
    """A scheduler's SIGTERM to the launcher reaches the ranks (training saves and exits), and the
    launcher waits for them: its exit code is theirs. Left alone, the ranks would run on unseen."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; from sed_megatron.launch import spawn_workers; "
                               f"sys.exit(spawn_workers('tests.launch_rank', [{str(tmp_path)!r}], 2, env={{}}))"],
        cwd=REPO)
    deadline = time.time() + 60
    while not all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)) and time.time() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 0
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["SIGTERM", "SIGTERM"]
