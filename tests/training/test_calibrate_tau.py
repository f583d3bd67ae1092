"""tools/calibrate_tau.py and the in-training calibration: the same τ at any layout."""

import os
import subprocess
import sys

import yaml

from sed_megatron.utils import free_port

from .launch import REPO, TINY, _env, train

TOOL = os.path.join(REPO, "tools", "calibrate_tau.py")


def calibrate(nproc, *flags):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run([torchrun, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), TOOL,
                          "--config", TINY, "--mask-ratio", "0.7", *flags],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("tau=")
    return float(last[4:])


def test_same_tau_at_dp1_dp2_tp2_and_in_training(tmp_path):
    written = str(tmp_path / "with_tau.yaml")
    # Without torchrun the tool starts its own TP x PP x CP processes (one here) and prints one line.
    out = subprocess.run([sys.executable, TOOL, "--config", TINY, "--mask-ratio", "0.7", "--tensor-model-parallel-size",
                          "1", "--write-config", written], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("tau=") and len(out.stdout.strip().splitlines()) == 1, out.stdout[-2000:]
    single = float(out.stdout.strip()[4:])
    assert 0.0 < single < 1.0
    # DP=2 splits the 100 samples 50/50 and gathers the values: exactly the same quantile.
    assert calibrate(2, "--tensor-model-parallel-size", "1") == single
    assert calibrate(2, "--tensor-model-parallel-size", "2") == single
    with open(written) as f:
        assert yaml.safe_load(f)["loss"]["tau"] == single

    # The training option calibrates the same initial model before its first step ...
    save = str(tmp_path / "run")
    records = train(str(tmp_path / "train"), 2, ["--train-iters", "2", "--save", save])
    with open(os.path.join(save, "sed_tau.json")) as f:
        assert yaml.safe_load(f)["tau"] == single
    assert 0.0 < records[0]["mask_rate"] < 1.0
    # ... and a resumed run reads it back instead of calibrating a trained model.
    moved = str(tmp_path / "run2")
    train(str(tmp_path / "resumed"), 2, ["--load", save, "--train-iters", "3", "--override-opt_param-scheduler",
                                         "--save", moved])
    with open(os.path.join(tmp_path, "resumed", "train.log")) as f:
        assert f"SED tau={single!r} (calibrated earlier" in f.read()
    with open(os.path.join(moved, "sed_tau.json")) as f:  # travels with the checkpoints
        assert yaml.safe_load(f)["tau"] == single


def test_pp2_from_a_checkpoint_matches_tp1(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    train(str(tmp_path / "base"), 1, ["--tensor-model-parallel-size", "1", "--train-iters", "1", "--save", ckpt,
                                      "--sed-tau", "0.5"])
    tp1 = calibrate(1, "--tensor-model-parallel-size", "1", "--load", ckpt, "--calibration-tokens", "all")
    pp2 = calibrate(2, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2", "--load", ckpt,
                    "--calibration-tokens", "all")
    assert pp2 == tp1
