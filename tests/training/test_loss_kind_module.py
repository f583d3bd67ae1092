"""A loss kind of one's own is one module: registered at run time, it trains with its own
flag and YAML key, and its report lands in metrics.jsonl; no other file changes."""

import os
import subprocess
import sys

import pytest

from .launch import REPO, TEST_FLAGS, TINY, read_metrics

# Whole processes (training, tools): the second phase of launch/run_tests.sh, beside the first.
pytestmark = pytest.mark.e2e

KIND_MODULE = '''
"""CE times a weight: the smallest kind of one's own (its gradient is the CE form times one number)."""
import torch
from sed_megatron.loss import LossKind, Param, register
from sed_megatron.loss.kinds import KindLoss, finite_number


@register
class WeightedCE(LossKind):
    name = "weighted_ce"
    params = (Param("ce_weight", 1.0, "--ce-weight", "the weight", check=finite_number(0.0, low_open=True)),)
    reports = ("weight",)

    def token_loss(self, cfg, terms):
        weight = torch.where(terms.valid, cfg.ce_weight, 0.0)
        return KindLoss(loss=weight * terms.ce, grad_scale=weight, mask=terms.ce.new_zeros(terms.ce.shape),
                        reports={"weight": weight})
'''


def test_a_kind_from_one_module_trains(tmp_path):
    (tmp_path / "my_kinds.py").write_text(KIND_MODULE)
    config = tmp_path / "run.yaml"
    with open(TINY) as f:
        config.write_text(f.read().replace("loss:\n  kind: sed", "loss:\n  module: my_kinds\n  kind: weighted_ce\n  "
                                           "ce_weight: 0.25"))
    metrics = tmp_path / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TORCHDYNAMO_DISABLE": "1"}
    run = subprocess.run([sys.executable, "-m", "sed_megatron.train", "--config", str(config), *TEST_FLAGS,
                          "--tensor-model-parallel-size", "1", "--train-iters", "2", "--metrics-file", str(metrics),
                          "--save", str(tmp_path / "save"), "--ce-weight", "0.5"],  # the flag wins over the YAML key
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = read_metrics(metrics)
    assert [r["iteration"] for r in records] == [1, 2]
    for record in records:
        assert abs(record["loss"] - 0.5 * record["ce_loss"]) < 1e-5 * record["ce_loss"]
        assert record["weighted_ce_weight"] == 0.5  # its report, as "<kind>_<stat>"
    # A module that does not import is one line naming the flag.
    bad = subprocess.run([sys.executable, "-m", "sed_megatron.train", "--config", TINY, "--loss-module", "no_such_kinds"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "sed_megatron.train: error: --loss-module no_such_kinds: cannot import it (ModuleNotFoundError: No module "
        "named 'no_such_kinds')"]
