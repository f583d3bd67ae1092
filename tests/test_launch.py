"""The ranks a tool starts itself (sed_megatron.launch.spawn_workers), as torchrun's agent would."""

import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(directory):
    """spawn_workers of two tests/launch_rank.py ranks in a process of its own, once both are ready."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; from sed_megatron.launch import spawn_workers; "
                               f"sys.exit(spawn_workers('tests.launch_rank', [{str(directory)!r}], 2, env={{}}))"],
        cwd=REPO)
    deadline = time.time() + 60
    while not all((directory / f"ready{rank}").exists() for rank in (0, 1)) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # the pid written
    return launcher


def test_sigterm_to_the_launcher_reaches_every_rank(tmp_path):
    """A scheduler's SIGTERM to the launcher reaches the ranks (training saves and exits), and the
    launcher waits for them: its exit code is theirs. Left alone, the ranks would run on unseen."""
    launcher = _launch(tmp_path)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 0
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["SIGTERM", "SIGTERM"]


def test_a_rank_killed_stops_the_others_and_names_the_signal(tmp_path):
    """kill -9 of one rank: the launcher stops the other (after STOP_GRACE_S) and exits 128 + 9, as a
    shell reports it."""
    launcher = _launch(tmp_path)
    os.kill(int((tmp_path / "ready1").read_text()), signal.SIGKILL)
    assert launcher.wait(timeout=30) == 137
    assert not (tmp_path / "rank0").exists()  # stopped, not left waiting for its signal
