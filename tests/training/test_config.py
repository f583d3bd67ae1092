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
    assert all(flag in out.stdout for flag in ("--sed-tau", "--sft-pack", "--help-megatron", "--lora-rank"))
    # Ours only (Megatron's own flags are about 1,000 lines more).
    assert "--tensor-model-parallel-size" not in out.stdout and len(out.stdout.splitlines()) < 250
    out = run_train("--help-megatron")  # Megatron-LM 0.19 has help texts with a bare '%', which argparse chokes on
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--sed-tau" in out.stdout and "--tensor-model-parallel-size" in out.stdout


def test_paper_recipes_expand_to_what_they_were(parser):
    """The paper recipes are a base per model plus small per-loss files (`include:`); expanded,
    each sets exactly what the whole file did before (golden/paper_recipes.json)."""
    import json

    with open(os.path.join(os.path.dirname(__file__), "golden", "paper_recipes.json")) as f:
        golden = json.load(f)
    recipes = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "examples", "paper", "*x8_*.yaml"))}
    assert recipes == set(golden)
    for name, argv in golden.items():
        expanded = expand_config(["--config", os.path.join(REPO, "examples", "paper", name)], parser)
        assert vars(parser.parse_args(expanded)) == {**vars(parser.parse_args(argv)), "config": os.path.join(
            REPO, "examples", "paper", name)}, name


def test_include_merges_sections_and_errors_name_the_including_file(parser, tmp_path):
    from sed_megatron.training.arguments import ConfigError

    (tmp_path / "base.yaml").write_text("training: {micro_batch_size: 2, seq_length: 64}\nloss: {kind: sed, tau: 0.5}\n")
    (tmp_path / "run.yaml").write_text("include: base.yaml\ntraining: {micro_batch_size: 4}\nloss: {lam: 2.0}\n")
    sources = {}
    args = parser.parse_args(expand_config(["--config", str(tmp_path / "run.yaml")], parser, sources))
    assert (args.micro_batch_size, args.seq_length, args.loss_type, args.sed_tau, args.sed_lambda) == (4, 64, "sed", 0.5,
                                                                                                       2.0)
    assert sources["seq_length"] == f"{tmp_path / 'base.yaml'}: training.seq_length"  # named where it is set
    assert sources["micro_batch_size"] == f"{tmp_path / 'run.yaml'}: training.micro_batch_size"
    (tmp_path / "bad.yaml").write_text("include: base.yaml\nloss: {tua: 1}\n")
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\n")
    (tmp_path / "missing.yaml").write_text("include: nowhere.yaml\n")
    for name, message in (("bad.yaml", r"bad\.yaml: loss\.tua: unknown key"), ("loop.yaml", "a cycle"),
                          ("missing.yaml", r"include: nowhere\.yaml: no such file")):
        with pytest.raises(ConfigError, match=message):
            expand_config(["--config", str(tmp_path / name)], parser)
