"""Non-finite losses and gradients: detected before the optimizer step, reported in one line.

Megatron's --check-for-nan-in-loss-and-grad (on by default) checks every gradient bucket before
the data-parallel reduction; `check_loss` adds the loss of each micro-batch. Both go through
Megatron's rerun state machine, which raises before the optimizer touches the weights, so no
checkpoint ever holds the iteration. `describe` turns that exception into the line the user
sees. `Injection` makes the loss or its gradients NaN at a given iteration, to test all this.
"""

import re
from dataclasses import dataclass
from typing import Callable

import torch

INJECTABLE = ("loss", "grad")
_RERUN_FAILURE = re.compile(r"^Rank (\d+), .*iteration (\d+): Unexpected result (\S+) \(message='(.*)'\)$", re.S)


def check_loss(loss_sum):
    """Reject a NaN or Inf micro-batch loss through Megatron's rerun state machine (fatal)."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    machine = get_rerun_state_machine()
    machine.validate_result(result=loss_sum, rejection_func=torch.isnan, message="NaN in the loss", fatal=True)
    machine.validate_result(result=loss_sum, rejection_func=torch.isinf, message="Inf in the loss", fatal=True)


def describe(error):
    """A one-line description of a rerun-state-machine rejection, or None for other errors.

    (The state machine's own iteration count also counts its re-runs: the caller names the
    iteration.)"""
    match = _RERUN_FAILURE.match(str(error))
    if match is None:
        return None
    rank, _, value, message = match.groups()
    message = re.sub(r"found (NaN|Inf) in local grad norm for bucket #(\d+) .*", r"\1 in the gradients (bucket \2)",
                     message)
    return f"{message} (value {value}, rank {rank})"


class _NaNGradient(torch.autograd.Function):
    """Identity forward; NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@dataclass(frozen=True)
class Injection:
    """Make the loss (what="loss") or only its gradients (what="grad") NaN at one iteration."""

    iteration: int
    what: str
    clock: Callable[[], int]
    """The iteration being computed now (1-based)."""

    @classmethod
    def parse(cls, text, clock):
        iteration, _, what = text.partition(":")
        if not iteration.isdigit() or what not in INJECTABLE:
            raise ValueError(f"--inject-non-finite {text!r}: expected ITERATION:loss or ITERATION:grad")
        return cls(int(iteration), what, clock)

    def __call__(self, loss_sum):
        if self.clock() != self.iteration:
            return loss_sum
        return loss_sum * float("nan") if self.what == "loss" else _NaNGradient.apply(loss_sum)
