"""Start-up checks: each bad setting stops the run with one line naming the flag (and its YAML key)."""

import argparse
import glob
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
    from sed_megatron.training.arguments import expand_config
    from sed_megatron.world import option_names

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


def test_moe_needs(parser):
    """Expert TP must split each expert's MLP; grouped GEMM needs TE; a capacity factor drops tokens (a notice)."""
    moe = ["--config", TINY, "--num-experts", "6", "--moe-ffn-hidden-size", "30"]
    assert fails(parser, moe + ["--expert-tensor-parallel-size", "4"], 4) == (
        "--moe-ffn-hidden-size 30 (each expert's MLP) does not split over --expert-tensor-parallel-size 4: use an "
        "--expert-tensor-parallel-size that divides it (1, 2, 3, 5, 6, 10, 15, 30)")
    assert "over expert TP = --tensor-model-parallel-size 4: " in fails(
        parser, moe + ["--tensor-model-parallel-size", "4", "--num-query-groups", "4"], 4)
    assert fails(parser, moe).startswith(  # the example's TP=2
        f"--tensor-model-parallel-size 2 ({TINY}: parallel.tensor_model_parallel_size) with MoE layers needs "
        f"--sequence-parallel")
    assert validate_run(settings(parser, moe), 2, training=False) == ([], [])  # compare, calibration: forward only
    moe += ["--tensor-model-parallel-size", "1"]
    assert fails(parser, moe + ["--moe-grouped-gemm"]).startswith(
        "--moe-grouped-gemm: grouped GEMM experts need Transformer Engine layers")
    notices, _ = validate_run(settings(parser, moe + ["--moe-expert-capacity-factor", "1.0"]), 2)
    assert notices == ["--moe-expert-capacity-factor 1.0: experts drop the tokens beyond their capacity "
                       "(a Hugging Face model drops none)"]
    assert validate_run(settings(parser, moe + ["--expert-model-parallel-size", "2"]), 2) == ([], [])


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


def test_sequence_and_context_parallel(parser):
    # The local layers run both now; what remains are the layout rules and the CP variants the
    # local attention lacks, each named by its flag.
    validate_run(settings(parser, ["--config", TINY, "--sequence-parallel"]), 2)
    validate_run(settings(parser, ["--config", TINY, "--tensor-model-parallel-size", "1",
                                   "--context-parallel-size", "2"]), 2)
    validate_run(settings(parser, ["--config", TINY, "--context-parallel-size", "2", "--sequence-parallel"]), 4)
    assert fails(parser, ["--config", TINY, "--tensor-model-parallel-size", "1", "--sequence-parallel"]).startswith(
        "--sequence-parallel needs more than one tensor-parallel rank (--tensor-model-parallel-size 1):")
    assert fails(parser, ["--config", TINY, "--tensor-model-parallel-size", "1", "--context-parallel-size", "2",
                          "--seq-length", "62"]) == (
        "--seq-length 62 is not a multiple of 2 x --context-parallel-size 2 = 4: each CP rank holds 2 of 2 x CP "
        "equal chunks of every sequence")
    assert "tokens per CP rank do not split over --tensor-model-parallel-size 4" in fails(
        parser, ["--config", TINY, "--tensor-model-parallel-size", "4", "--num-query-groups", "4", "--context-parallel-size",
                 "2", "--seq-length", "68", "--sequence-parallel"], 8)
    assert fails(parser, ["--config", TINY, "--tensor-model-parallel-size", "1", "--context-parallel-size", "2",
                          "--hybrid-context-parallel"]).startswith(
        "--hybrid-context-parallel: hybrid context parallelism needs Transformer Engine layers")


def test_fused_linear_settings(parser):
    validate_run(settings(parser, ["--config", TINY, "--sft-fused-linear", "--sft-fused-chunk-tokens", "5"]), 2)
    assert fails(parser, ["--config", TINY, "--sft-fused-linear", "--sft-fused-chunk-tokens", "0"]) == (
        "--sft-fused-chunk-tokens 0 must be at least 1")
    assert fails(parser, ["--config", TINY, "--sft-fused-chunk-tokens", "8"]) == (
        "--sft-fused-chunk-tokens 8 has no effect without --sft-fused-linear")
    assert fails(parser, ["--config", TINY, "--sft-fused-linear", "--mtp-num-layers", "1"]).startswith(
        "--sft-fused-linear with --mtp-num-layers 1: the fused loss computes only the output layer's logits")
    validate_run(settings(parser, ["--config", TINY, "--sft-fused-linear", "--sft-fused-mode", "recompute"]), 2)
    assert fails(parser, ["--config", TINY, "--sft-fused-mode", "grad-in-forward"]) == (
        "--sft-fused-mode grad-in-forward has no effect without --sft-fused-linear")
    # Megatron would pop the deferred activations from an empty buffer at the first step.
    assert fails(parser, ["--config", TINY, "--sft-fused-linear", "--defer-embedding-wgrad-compute",
                          "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]).startswith(
        "--sft-fused-linear with --defer-embedding-wgrad-compute: the fused loss forms the output layer's weight "
        "gradient itself")


def test_deferred_embedding_gradient_needs_the_fusion(parser):
    """Without apex's extension gradient-accumulation fusion is off (runtime.missing_kernel_flags),
    and Megatron's config would refuse the deferral later, as a traceback."""
    message = fails(parser, ["--config", TINY, "--defer-embedding-wgrad-compute", "--pipeline-model-parallel-size",
                             "2", "--no-gradient-accumulation-fusion"], world_size=4)
    assert message.startswith("--defer-embedding-wgrad-compute needs Megatron's gradient-accumulation fusion, which "
                              "is off")


PAPER_ARCHITECTURES = {  # the converted checkpoints' model files carry these; the recipes have no model section
    "llama32_3b": ["--num-layers", "28", "--hidden-size", "3072", "--ffn-hidden-size", "8192",
                   "--num-attention-heads", "24", "--group-query-attention", "--num-query-groups", "8"],
    "qwen25_math_7b": ["--num-layers", "28", "--hidden-size", "3584", "--ffn-hidden-size", "18944",
                       "--num-attention-heads", "28", "--group-query-attention", "--num-query-groups", "4"],
    "qwen3_8b": ["--num-layers", "36", "--hidden-size", "4096", "--ffn-hidden-size", "12288", "--kv-channels", "128",
                 "--num-attention-heads", "32", "--group-query-attention", "--num-query-groups", "8", "--qk-layernorm"],
    "qwen3_30b_a3b": ["--num-layers", "48", "--hidden-size", "2048", "--ffn-hidden-size", "6144", "--kv-channels",
                      "128", "--num-attention-heads", "32", "--group-query-attention", "--num-query-groups", "4",
                      "--qk-layernorm", "--num-experts", "128", "--moe-router-topk", "8", "--moe-ffn-hidden-size",
                      "768"],
}


RECIPES = sorted(glob.glob(os.path.join(REPO, "examples", "paper", "*x8_*.yaml")))  # the bases are included by them


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_paper_recipes_pass_the_start_up_checks(parser, path):
    """Each recipe's layout (32k-token packed rows) at its node count, with its model's heads."""
    name = os.path.basename(path)
    model = next(key for key in PAPER_ARCHITECTURES if name.startswith(key))
    world = 8 * int(name.split("_")[-2][0])  # ..._1x8_sed.yaml: 1 node of 8 GPUs
    s = settings(parser, ["--config", path, *PAPER_ARCHITECTURES[model]])
    assert s.seq_length == 32768 and s.sft_pack
    assert validate_run(s, world) == ([], [])


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


def test_self_launched_run_reports_bad_input_once(tmp_path):
    """Without torchrun, training starts its TP ranks itself: a bad setting is one line from the
    launching process (not one per rank), and no rank starts."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "sed_megatron.train", "--config", TINY, "--num-attention-heads", "3",
                           "--num-query-groups", "3", "--save", str(tmp_path / "out")],
                          cwd=REPO, env={**env, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "sed_megatron.train: error: --num-attention-heads 3 does not split over --tensor-model-parallel-size 2 "
        f"({TINY}: parallel.tensor_model_parallel_size): use a TP that divides it (1, 3)"]
    assert not (tmp_path / "out").exists()
