"""tools/calibrate_tau.py and the in-training calibration: the same τ at any layout.

Launches are few (each costs seconds of start-up on 2 cores): the tool once without torchrun,
once at TP=2 x DP=2, a two-step training run and its resumption (both one process), then the
tool at TP=1 and PP=2 on the checkpoint that run saved.
"""

import os

import pytest
import yaml

from .launch import REPO, TINY, _env, train

TOOL = os.path.join(REPO, "tools", "calibrate_tau.py")


def calibrate(nproc, *flags):
    """The tool's ranks as torchrun starts them; one process: without them (the tool sets up its own world)."""
    from tests import warm

    out = warm.capture(TOOL, ["--config", TINY, "--mask-ratio", "0.7", *flags], env=_env(), cwd=REPO, nproc=nproc,
                       timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("tau=")
    return float(last[4:])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The tool's τ on the initial model (one process, no torchrun), the config it wrote, and a
    two-step training run that calibrated before its first step and saved (run/)."""
    tmp_path = tmp_path_factory.mktemp("calibrated")
    written = str(tmp_path / "with_tau.yaml")
    # Without torchrun the tool starts its own TP x PP x CP processes (one here) and prints one line.
    from tests import warm

    out = warm.capture(TOOL, ["--config", TINY, "--mask-ratio", "0.7", "--tensor-model-parallel-size", "1",
                              "--write-config", written], env=_env(), cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("tau=") and len(out.stdout.strip().splitlines()) == 1, out.stdout[-2000:]
    single = float(out.stdout.strip()[4:])
    save = str(tmp_path / "run")
    records = train(str(tmp_path / "train"), 1, ["--tensor-model-parallel-size", "1", "--train-iters", "2",
                                                 "--save", save])
    return {"tau": single, "written": written, "save": save, "records": records, "tmp": tmp_path}


def test_same_tau_at_dp1_dp2_tp2_and_in_training(calibrated):
    single = calibrated["tau"]
    assert 0.0 < single < 1.0
    # DP=2 splits the 100 samples 50/50 and gathers the values, TP=2 splits the vocabulary of
    # each: exactly the same quantile (one launch of TP=2 x DP=2).
    assert calibrate(4, "--tensor-model-parallel-size", "2") == single
    with open(calibrated["written"]) as f:
        assert yaml.safe_load(f)["loss"]["tau"] == single

    # The training option calibrates the same initial model before its first step ...
    save, tmp_path = calibrated["save"], calibrated["tmp"]
    with open(os.path.join(save, "sed_tau.json")) as f:
        assert yaml.safe_load(f)["tau"] == single
    assert 0.0 < calibrated["records"][0]["mask_rate"] < 1.0
    # ... and a resumed run reads it back instead of calibrating a trained model.
    moved = str(tmp_path / "run2")
    train(str(tmp_path / "resumed"), 1, ["--tensor-model-parallel-size", "1", "--load", save, "--train-iters", "3",
                                         "--override-opt_param-scheduler", "--save", moved])
    with open(os.path.join(tmp_path, "resumed", "train.log")) as f:
        assert f"SED tau={single!r} (calibrated earlier" in f.read()
    with open(os.path.join(moved, "sed_tau.json")) as f:  # travels with the checkpoints
        assert yaml.safe_load(f)["tau"] == single


def test_pp2_from_a_checkpoint_matches_tp1(calibrated):
    """The weights of a checkpoint (the training run's, two steps from the initial model) at
    TP=1 and at PP=2 (random init differs per stage, a checkpoint does not), every token."""
    ckpt = calibrated["save"]
    tp1 = calibrate(1, "--tensor-model-parallel-size", "1", "--load", ckpt, "--calibration-tokens", "all")
    pp2 = calibrate(2, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2", "--load", ckpt,
                    "--calibration-tokens", "all")
    assert pp2 == tp1
