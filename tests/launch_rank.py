"""A rank for tests/test_launch.py: says it is ready (DIRECTORY/ready<RANK> holds its pid), waits
for SIGTERM (20 s at most), writes what it got into DIRECTORY/rank<RANK>, exits 0."""

import os
import signal
import sys
import time


def main(directory):
    rank, got = os.environ["RANK"], []
    signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    with open(os.path.join(directory, f"ready{rank}"), "w") as f:
        f.write(str(os.getpid()))
    deadline = time.time() + 20
    while not got and time.time() < deadline:
        time.sleep(0.05)
    with open(os.path.join(directory, f"rank{rank}"), "w") as f:
        f.write("SIGTERM" if got else "no signal")


if __name__ == "__main__":
    main(sys.argv[1])
