"""A NaN loss or gradient stops training in one line before the optimizer step; resume works."""

import os

import pytest
import torch

from sed_megatron.training.nonfinite import Injection, _NaNGradient, describe
from tests import warm

from .launch import REPO, TINY, _command, _env, read_metrics, train

FLAGS = ["--tensor-model-parallel-size", "1", "--train-iters", "4", "--save-interval", "2", "--loss-type", "ce",
         "--sed-calibrate-ratio", "0.0"]  # CE: no calibration (tau is not needed)


def test_describe_rerun_failures():
    loss = RuntimeError("Rank 0, node n, device 0, iteration 3: Unexpected result nan (message='NaN in the loss')")
    assert describe(loss) == "NaN in the loss (value nan, rank 0)"
    grad = RuntimeError("Rank 1, node n, device 0, iteration 7: Unexpected result inf (message='found Inf in local "
                        "grad norm for bucket #2 in backward pass before data-parallel communication collective')")
    assert describe(grad) == "Inf in the gradients (bucket 2) (value inf, rank 1)"
    assert describe(RuntimeError("something else")) is None


def test_injection():
    clock = [1]
    inject = Injection.parse("2:grad", lambda: clock[0])
    x = torch.tensor(3.0, requires_grad=True)
    assert inject(x) is x
    clock[0] = 2
    y = inject(x)
    assert y.item() == 3.0
    y.backward()
    assert torch.isnan(x.grad)
    assert torch.isnan(Injection.parse("2:loss", lambda: 2)(x))
    with pytest.raises(ValueError, match="expected ITERATION:loss or ITERATION:grad"):
        Injection.parse("x:loss", lambda: 1)
    assert _NaNGradient is not None


def test_non_finite_stops_before_the_step_and_resumes(tmp_path):
    """A NaN loss at iteration 3 stops the run; resumed from iteration 2 with a NaN gradient at 3
    it stops again; resumed without a fault it completes (three launches in a chain)."""
    save = tmp_path / "ckpt"
    for run, (what, message) in enumerate((("loss", "NaN in the loss"), ("grad", "NaN in the gradients (bucket 0)"))):
        metrics = tmp_path / f"metrics_{what}.jsonl"
        resume = ["--load", str(save)] if run else []
        cmd = _command(1, ["--metrics-file", str(metrics), *FLAGS, "--save", str(save), *resume,
                           "--inject-non-finite", f"3:{what}"], TINY)
        out = warm.capture("sed_megatron.train", cmd[3:], env=_env(), cwd=REPO, timeout=600)  # cmd: python -m module ...
        assert out.returncode != 0
        errors = [line for line in out.stderr.splitlines() if "sed_megatron.train: error:" in line]
        assert len(errors) == 1 and errors[0].startswith(f"sed_megatron.train: error: iteration 3: {message}"), errors
        assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"  # the last good one
        assert not (save / "iter_0000003").exists() and not (save / "iter_0000004").exists()
        logged = read_metrics(metrics) if metrics.exists() else []
        assert [r["iteration"] for r in logged] == ([] if run else [1, 2])  # iteration 3 is never logged
    # Resume from the last good checkpoint, without the fault.
    records = train(str(tmp_path / "resume"), 1, [*FLAGS, "--load", str(save), "--save", str(save)])
    assert [r["iteration"] for r in records] == [3, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert os.path.exists(save / "iter_0000004")
