"""YAML run configuration: every shipped example loads, bad keys are clear errors, flags win."""

import glob
import os
import subprocess
import sys

import pytest

from sed_megatron.training.arguments import ConfigError, add_sed_arguments, expand_config, loss_config_from_args

from .launch import REPO


@pytest.fixture(scope="module")
def parser():
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    return add_sed_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))


EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "**", "*.yaml"), recursive=True))


def test_there_are_examples():
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_every_example_loads(parser, path):
    import yaml

    args = parser.parse_args(expand_config(["--config", path], parser))
    loss_config_from_args(args)  # raises on an invalid loss section
    assert args.train_iters and args.seq_length
    with open(path) as f:
        if "model" in yaml.safe_load(f):
            assert args.num_layers and args.hidden_size
        else:  # a recipe for a converted checkpoint: the architecture comes with --load
            assert args.num_layers is None


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_command_line_wins_over_yaml(parser, tmp_path):
    path = write(tmp_path, "optimizer: {lr: 0.1}\nloss: {kind: sed, tau: 0.5}\nmodel: {swiglu: true}\n")
    args = parser.parse_args(expand_config(["--config", path, "--lr", "0.25", "--sed-tau", "0.7"], parser))
    assert args.lr == 0.25 and args.sed_tau == 0.7 and args.swiglu and args.loss_type == "sed"


def test_store_false_flag_by_its_option_name(parser, tmp_path):
    path = write(tmp_path, "training: {no_gradient_accumulation_fusion: true}\n")
    args = parser.parse_args(expand_config(["--config", path], parser))
    assert args.gradient_accumulation_fusion is False


@pytest.mark.parametrize(
    "text,message",
    [
        ("model: {num_layerz: 2}\n", "model.num_layerz: unknown Megatron-LM flag --num-layerz"),
        ("loss: {kind: sed, taux: 0.5}\n", "loss.taux: unknown key"),
        ("data: {pathh: x}\n", "data.pathh: unknown key"),
        ("modle: {num_layers: 2}\n", "unknown section 'modle'"),
        ("model: {swiglu: 3}\n", "model.swiglu: --swiglu is a switch"),
        ("model: {num_layers: [1, 2]}\n", "model.num_layers: --num-layers takes one value"),
        ("model: {loss_type: sed}\n", "model.loss_type: unknown Megatron-LM flag"),
        ("model: [1, 2]\n", "section 'model' must be a mapping"),
        ("model: {num_layers: 2\n", "not valid YAML"),
    ],
)
def test_bad_yaml_names_file_and_key(parser, tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        expand_config(["--config", path], parser)
    assert str(err.value).startswith(path) and message in str(err.value)


def test_missing_config_file(parser, tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        expand_config(["--config", str(tmp_path / "absent.yaml")], parser)


def run_train(*argv):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "sed_megatron.train", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


# The command-line errors (one line, exit 2) are rows of docs/RELIABILITY.md, run by tests/test_reliability.py.


def test_cli_help_lists_our_flags_and_megatrons():
    out = run_train("--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--sed-tau" in out.stdout and "--sft-pack" in out.stdout and "--help-megatron" in out.stdout
    assert "--tensor-model-parallel-size" not in out.stdout and len(out.stdout.splitlines()) < 120
    out = run_train("--help-megatron")  # Megatron-LM 0.19 has help texts with a bare '%', which argparse chokes on
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--sed-tau" in out.stdout and "--tensor-model-parallel-size" in out.stdout
