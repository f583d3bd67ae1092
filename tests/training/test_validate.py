"""Start-up checks: each bad setting stops the run with one line naming the flag (and its YAML key)."""

import argparse
import os

import pytest
import yaml

from sed_megatron.training.validate import Settings, StartupError, validate_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def parser():
    from megatron.training.arguments import add_megatron_arguments

    from sed_megatron.training.arguments import add_sed_arguments

    return add_sed_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))


def settings(parser, argv):
    from sed_megatron.training.arguments import expand_config, option_names

    sources = {}
    expanded = expand_config(argv, parser, sources)
    return Settings(parser.parse_args(["--transformer-impl", "local", *expanded]), option_names(parser), sources)


def write_yaml(tmp_path, edit):
    with open(TINY) as f:
        config = yaml.safe_load(f)
    edit(config)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def fails(parser, argv, world_size=2):
    with pytest.raises(StartupError) as err:
        validate_run(settings(parser, argv), world_size)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_the_example_passes(parser):
    notices, extra = validate_run(settings(parser, ["--config", TINY]), 2)
    assert notices == [] and extra == []


def test_layout_errors_name_the_flag_and_its_yaml_key(parser, tmp_path):
    config = write_yaml(tmp_path, lambda c: c["model"].update(num_attention_heads=9, num_query_groups=3,
                                                              kv_channels=8))
    message = fails(parser, ["--config", config])
    assert message == (f"--num-attention-heads 9 ({config}: model.num_attention_heads) does not split over "
                       f"--tensor-model-parallel-size 2 ({config}: parallel.tensor_model_parallel_size): use a TP "
                       f"that divides it (1, 3, 9)")
    # The command line wins, and is named as such.
    message = fails(parser, ["--config", TINY, "--tensor-model-parallel-size", "3"], world_size=3)
    assert message.startswith("--num-attention-heads 4 (") and "over --tensor-model-parallel-size 3: use" in message
    assert "does not divide the 2 processes" in fails(parser, ["--config", TINY, "--pipeline-model-parallel-size", "2"])
    assert "--num-query-groups 2" in fails(parser, ["--config", TINY, "--tensor-model-parallel-size", "4"], 4)
    assert "does not split evenly over --pipeline-model-parallel-size 4" in fails(
        parser, ["--config", TINY, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "4"], 4)


def test_expert_layouts(parser):
    base = ["--config", TINY, "--tensor-model-parallel-size", "1"]
    assert "needs a model with experts" in fails(parser, base + ["--expert-model-parallel-size", "2"])
    assert "--num-experts 6 does not split over --expert-model-parallel-size 4 (1, 2, 3, 6 do)" in fails(
        parser, base + ["--num-experts", "6", "--expert-model-parallel-size", "4"], 4)


def test_batch_arithmetic(parser):
    message = fails(parser, ["--config", TINY, "--tensor-model-parallel-size", "1", "--global-batch-size", "6"])
    assert message.startswith("--global-batch-size 6 is not a multiple of --micro-batch-size 4 (")
    assert message.endswith("x 2 data-parallel ranks = 8")


def test_required_settings(parser, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert fails(parser, ["--config", str(empty)]) == (
        "--micro-batch-size is required (set it on the command line or in the YAML)")


def test_warmup_longer_than_the_run(parser):
    message = fails(parser, ["--config", TINY, "--train-iters", "3"])
    assert message.startswith("--lr-warmup-iters 5 (") and message.endswith("--train-iters 3")


def test_features_the_local_layers_lack(parser):
    assert fails(parser, ["--config", TINY, "--sequence-parallel"]).startswith(
        "--sequence-parallel: sequence parallelism needs Transformer Engine layers")
    assert "context parallelism needs Transformer Engine" in fails(
        parser, ["--config", TINY, "--tensor-model-parallel-size", "1", "--context-parallel-size", "2"])


def test_load_without_a_checkpoint(parser, tmp_path):
    missing = str(tmp_path / "typo")
    message = fails(parser, ["--config", TINY, "--load", missing, "--finetune", "--save", str(tmp_path / "out")])
    assert message.startswith(f"--load {missing}: no checkpoint there") and "--finetune" in message
    assert "differs from --save" in fails(parser, ["--config", TINY, "--load", missing, "--save", str(tmp_path)])
    # --load X --save X: the auto-resume pattern starts fresh, and says so.
    notices, extra = validate_run(settings(parser, ["--config", TINY, "--load", missing, "--save", missing]), 2)
    assert notices[0] == f"no checkpoint in {missing} yet: training starts from the initial weights and saves there"


def test_save_without_interval_saves_at_the_end(parser, tmp_path):
    out = str(tmp_path / "out")
    notices, extra = validate_run(settings(parser, ["--config", TINY, "--save", out, "--train-iters", "30",
                                                     "--save-interval", "7"]), 2)
    assert extra == [] and notices == []
    config = write_yaml(tmp_path, lambda c: c["checkpoint"].pop("save_interval"))
    notices, extra = validate_run(settings(parser, ["--config", config, "--save", out, "--train-iters", "30"]), 2)
    assert extra == ["--save-interval", "30"] and "saving at the end (iteration 30)" in notices[0]
