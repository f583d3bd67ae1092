"""Testing only: a worker that dies, freezes or raises at an iteration (--inject-fault).

    --inject-fault ITERATION:WHAT[:RANK[:ATTEMPT]]     WHAT: kill (SIGKILL), stop (SIGSTOP), raise

The fault strikes global rank RANK (default 0) as it starts iteration ITERATION (its first
forward step), in torchrun attempt ATTEMPT (resume.job_attempt: the rendezvous round; default 0, `all`: every
attempt), so a restarted run goes on; several --inject-fault flags chain faults in one job.
"""

import os
import signal
import time
from dataclasses import dataclass

WHATS = ("kill", "stop", "raise")


class InjectedFault(RuntimeError):
    """What --inject-fault ITERATION:raise raises."""


@dataclass(frozen=True)
class Fault:
    iteration: int
    what: str
    rank: int = 0
    attempt: int | None = 0
    """None: every attempt."""

    @classmethod
    def parse(cls, text):
        parts = text.split(":")
        ok = 2 <= len(parts) <= 4 and parts[0].isdigit() and parts[1] in WHATS
        ok = ok and (len(parts) < 3 or parts[2].isdigit()) and (len(parts) < 4 or parts[3].isdigit()
                                                                or parts[3] == "all")
        if not ok:
            raise ValueError(f"--inject-fault {text!r}: expected ITERATION:kill|stop|raise[:RANK[:ATTEMPT|all]]")
        attempt = None if len(parts) == 4 and parts[3] == "all" else int(parts[3]) if len(parts) == 4 else 0
        return cls(int(parts[0]), parts[1], int(parts[2]) if len(parts) > 2 else 0, attempt)


class FaultInjection:
    """Wraps the forward step: the faults of this rank and attempt, each at its iteration."""

    def __init__(self, specs, clock):
        self.faults = [Fault.parse(text) for text in specs]
        self.clock = clock
        """The iteration being computed now (1-based)."""
        self.rank = int(os.environ.get("RANK", "0"))
        from .resume import job_attempt

        self.attempt = job_attempt()

    def wrap(self, forward_step):
        mine = [f for f in self.faults if f.rank == self.rank and f.attempt in (None, self.attempt)]
        if not mine:
            return forward_step

        def forward_with_faults(*args, **kwargs):
            iteration = self.clock()
            for fault in mine:
                if fault.iteration == iteration:
                    print(f"sed_megatron.train: --inject-fault: {fault.what} at iteration {iteration} on rank "
                          f"{self.rank} (attempt {self.attempt})", flush=True)
                    if fault.what == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    elif fault.what == "stop":
                        time.sleep(0.5)  # the watchdog publishes the last finished iteration first
                        os.kill(os.getpid(), signal.SIGSTOP)
                    else:
                        raise InjectedFault(f"injected fault at iteration {iteration} on rank {self.rank}")
            return forward_step(*args, **kwargs)

        return forward_with_faults
