"""Training on Megatron-LM's loop: layout parity, loss kinds, resume, SIGTERM (torchrun, gloo, CPU).

Every run here fine-tunes the same TP=1 checkpoint (made once per module) without its optimizer
state, so all layouts start from identical weights and read the same samples in the same order.
Each run calibrates tau on that initial model before its first step (100 validation samples),
so every layout also shows that the calibration is layout-free.

Each launch costs seconds of start-up on 2 cores, so the layouts combine parallelisms: every one
of TP, PP, DP (distributed optimizer), SP and CP runs against the TP=1 curve in at least one
layout, and the runs do double duty (tp2 saves the checkpoint the resume test starts from; the
SIGTERM test resumes at PP=2). Each parallelism alone against its unparallel twin, in one process
pair: tests/models/test_layers.py (SP norms, CP attention), tests/runtime/test_cpu_runtime.py
(TP), tests/data/test_packing.py (CP batches), tests/loss/test_loss_parity.py (vocab-parallel loss).
"""

import json
import os
import re

import pytest

from .launch import read_metrics, train, train_until_sigterm

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny_finetune.json")
PARITY_ITERS = 5
RESUME_FROM = 3  # the tp2 run saves this iteration; the resume test continues from it
PP2 = (2, ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"])
# No --sed-tau: tau is calibrated (an explicit tau would win). r = 0.5 puts tau at the initial
# median top-2 mass, so the SED mask splits the tokens for all 5 steps.
SED_FLAGS = ["--loss-type", "sed", "--sed-calibrate-ratio", "0.5", "--sed-top-k", "2", "--sed-lambda", "1.0"]
LAYOUTS = {  # name -> (processes, flags)
    "tp1": (1, ["--tensor-model-parallel-size", "1"]),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "dp2": (2, ["--tensor-model-parallel-size", "1", "--use-distributed-optimizer"]),
    # Sequence and context parallelism on the local layers (SP norms, the CP attention), with TP
    # and with PP: TP x SP x CP covers what tp2_sp, cp2 and tp2_cp2 covered one launch each; PP
    # alone runs in the SIGTERM test (resumed at PP=2 against the tp2 curve).
    "tp2_sp_cp2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2"]),
    # PP x CP with the fused output-layer loss (training and calibration) on the last stage,
    # against tp1's materialized logits. (The fused loss with SP and TP, and under Megatron's DDP
    # with tied embeddings: tests/loss/test_fused_linear.py.)
    "pp2_cp2_fused": (4, ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
                          "--context-parallel-size", "2", "--sft-fused-linear", "--sft-fused-chunk-tokens", "37"]),
}
# Same model, same data, sums in another order: fp32 round-off grows over Adam steps; the runs
# here agree to ~1e-7, so 2e-5 relative catches any real difference (a wrong shard, a lost
# token, a per-micro-batch normalization, a CP chunk attending to the wrong keys) while
# allowing another reduction order. The same tolerance holds for SP, CP, TP x CP and PP x CP.
RTOL = 2e-5
# tau is one of the calibration values, each a top-2 mass from the same forward pass in another
# reduction order (~1e-7 apart): 1e-6 relative catches a lost sample or chunk.
TAU_RTOL = 1e-6


def calibrated_tau(log_path):
    """The tau a run calibrated before its first step (its 'SED tau=...' line)."""
    with open(log_path) as f:
        found = re.findall(r"SED tau=([-+.\deE]+) calibrated", f.read())
    assert len(found) == 1, f"{log_path}: expected one calibration line, found {found}"
    return float(found[0])


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("base")
    train(str(run_dir), 1, ["--tensor-model-parallel-size", "1", "--train-iters", "1", "--save", str(run_dir / "ckpt"),
                            "--loss-type", "ce"])
    return str(run_dir / "ckpt")


def finetune_flags(base_checkpoint, iters):
    return ["--load", base_checkpoint, "--finetune", "--no-load-optim", "--no-load-rng", "--save", "",
            "--train-iters", str(iters), *SED_FLAGS]


@pytest.fixture(scope="module")
def layout_runs(base_checkpoint, tmp_path_factory):
    runs = {}
    for name, (nproc, flags) in LAYOUTS.items():
        run_dir = tmp_path_factory.mktemp(name)
        extra = []
        if name == "dp2":
            runs["dp2_tensorboard"] = str(run_dir / "tb")
            extra = ["--tensorboard-dir", runs["dp2_tensorboard"]]
        if name == "tp2":  # iteration 3 for test_resume_continues_the_same_curve (and 5, at the end)
            runs["tp2_checkpoint"] = str(run_dir / "ckpt")
            extra = ["--save", runs["tp2_checkpoint"], "--save-interval", str(RESUME_FROM)]
        runs[name] = train(str(run_dir), nproc, finetune_flags(base_checkpoint, PARITY_ITERS) + flags + extra)
        runs[f"{name}_log"] = str(run_dir / "train.log")
        runs[f"{name}_tau"] = calibrated_tau(runs[f"{name}_log"])
    return runs


def curve(records, key="loss"):
    return [r[key] for r in records]


def assert_curves_close(actual, expected, what):
    assert [r["iteration"] for r in actual] == [r["iteration"] for r in expected], what
    for key in ("loss", "ce_loss", "mask_rate", "topk_mass", "grad_norm"):
        got, want = curve(actual, key), curve(expected, key)
        assert got == pytest.approx(want, rel=RTOL, abs=1e-7), f"{what}: {key} {got} != {want}"


def test_layouts_give_the_same_loss_curve(layout_runs):
    reference = layout_runs["tp1"]
    assert len(reference) == PARITY_ITERS
    assert all(0.0 < r["mask_rate"] < 1.0 for r in reference), "tau must split the tokens"
    # The published meaning: mask_rate is the share WITHOUT the penalty, penalty_rate the rest.
    assert all(r["mask_rate"] + r["penalty_rate"] == pytest.approx(1.0, abs=1e-6) for r in reference)
    assert all(r["sed_penalty"] > 0 for r in reference)
    for name in LAYOUTS:
        assert_curves_close(layout_runs[name], reference, f"{name} vs tp1")
        assert layout_runs[f"{name}_tau"] == pytest.approx(layout_runs["tp1_tau"], rel=TAU_RTOL), name


def test_loss_curve_matches_golden(layout_runs):
    """Golden values from tp1; regenerate with SED_MEGATRON_WRITE_GOLDEN=1 after an intended change."""
    records = layout_runs["tp1"]
    if os.environ.get("SED_MEGATRON_WRITE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump([{k: r[k] for k in ("iteration", "loss", "ce_loss", "mask_rate", "topk_mass", "grad_norm")}
                       for r in records], f, indent=1)
    with open(GOLDEN) as f:
        golden = json.load(f)
    # Another CPU or BLAS build may round differently; 1e-4 still pins the curve.
    for got, want in zip(records, golden, strict=True):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), f"iteration {want['iteration']}: {key}"


def test_tensorboard_gets_the_metrics(layout_runs):
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(os.path.join(layout_runs["dp2_tensorboard"], "events.out.tfevents.*"))
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"lm loss", "ce loss", "mask rate", "penalty rate", "topk mass", "p target", "sed penalty",
            "grad-norm"} <= tags


def test_log_line_equals_metrics(layout_runs):
    """Megatron's log line and metrics.jsonl show the same value at every logged iteration."""
    import re

    with open(layout_runs["tp1_log"]) as f:
        lines = [line for line in f if re.search(r"iteration +\d+/", line)]
    records = layout_runs["tp1"]
    assert len(lines) == len(records) == PARITY_ITERS
    assert len({round(r["loss"], 6) for r in records}) == PARITY_ITERS  # the losses differ
    for line, record in zip(lines, records):
        assert int(re.search(r"iteration +(\d+)/", line).group(1)) == record["iteration"]
        for report, key in (("lm loss", "loss"), ("ce loss", "ce_loss"), ("mask rate", "mask_rate")):
            shown = float(re.search(rf"\| {report}: ([-+.\dE]+) \|", line).group(1))
            assert shown == pytest.approx(record[key], rel=1e-6, abs=1e-12), (record["iteration"], report)


def test_metrics_have_contract_keys(layout_runs):
    keys = {"iteration", "loss", "ce_loss", "mask_rate", "penalty_rate", "topk_mass", "p_target", "lr", "grad_norm",
            "tokens_per_sec"}
    for record in layout_runs["tp2"]:
        assert keys <= set(record), keys - set(record)
    assert all(r["tokens_per_sec"] > 0 and r["skipped"] == 0 for r in layout_runs["tp2"])


def test_resume_continues_the_same_curve(layout_runs, tmp_path):
    """Iteration 3 of the tp2 run (model, optimizer, scheduler, data position), resumed: the same
    steps 4 and 5, bit for bit. The resumed run is told 10000 iterations and stops at 5 through
    --exit-interval, saving there (Megatron's exit path)."""
    nproc, layout = LAYOUTS["tp2"]
    saved = str(tmp_path / "ckpt")
    resumed = train(str(tmp_path / "resumed"), nproc,
                    layout + SED_FLAGS + ["--load", layout_runs["tp2_checkpoint"], "--ckpt-step", str(RESUME_FROM),
                                          "--train-iters", "10000", "--override-opt_param-scheduler",
                                          "--exit-interval", str(PARITY_ITERS), "--save", saved])
    assert [r["iteration"] for r in resumed] == [4, 5]
    with open(os.path.join(saved, "latest_checkpointed_iteration.txt")) as f:
        assert int(f.read()) == PARITY_ITERS
    # Dropout is 0 and the LR constant: the resumed steps repeat the uninterrupted run's, bit for bit.
    assert curve(resumed) == curve(layout_runs["tp2"])[RESUME_FROM:]


def test_sigterm_leaves_a_checkpoint_that_resumes_at_another_layout(base_checkpoint, layout_runs, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    nproc, layout = LAYOUTS["tp2"]
    _, log = train_until_sigterm(str(tmp_path / "killed"), nproc,
                                  finetune_flags(base_checkpoint, 10_000) + layout
                                  + ["--save", ckpt, "--exit-signal-handler"], after_records=2)
    # torchrun forwards the signal to the workers and then reports it (exit 1); the workers
    # finish the step, save and exit cleanly.
    assert "exiting program after receiving SIGTERM" in log and "successfully saved checkpoint" in log, log[-4000:]
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        saved_iteration = int(f.read())
    killed = read_metrics(str(tmp_path / "killed" / "metrics.jsonl"))
    assert saved_iteration == killed[-1]["iteration"] >= 2

    nproc, layout = PP2
    # A shorter --train-iters than the killed run's: Megatron wants the schedule overridden
    # (constant LR here, so the schedule is the same).
    resumed = train(str(tmp_path / "resumed"), nproc,
                    layout + SED_FLAGS + ["--load", ckpt, "--train-iters", str(saved_iteration + 1), "--save", "",
                                          "--override-opt_param-scheduler"])
    assert [r["iteration"] for r in resumed] == [saved_iteration + 1]
    reference = layout_runs["tp2"]
    if len(reference) <= saved_iteration:  # the signal came late: extend the reference
        reference = train(str(tmp_path / "reference"), LAYOUTS["tp2"][0],
                          finetune_flags(base_checkpoint, saved_iteration + 1) + LAYOUTS["tp2"][1])
    assert resumed[0]["loss"] == pytest.approx(reference[saved_iteration]["loss"], rel=RTOL)


def test_bf16_follows_the_fp32_curve(base_checkpoint, layout_runs, tmp_path):
    """The production precision: bf16 weights and logits (the loss upcasts to fp32 internally)."""
    nproc, layout = LAYOUTS["tp2"]
    # The fp32 run's tau: the calibration itself is not what this compares.
    records = train(str(tmp_path), nproc, finetune_flags(base_checkpoint, PARITY_ITERS) + layout
                    + ["--bf16", "--sed-tau", repr(layout_runs["tp2_tau"])])
    # bf16 keeps 8 bits of mantissa: logits differ by ~1e-2 absolute, the mean loss by well under 1 %.
    for got, want in zip(records, layout_runs["tp2"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-2), (got["iteration"], got["loss"], want["loss"])
        assert got["ce_loss"] == pytest.approx(want["ce_loss"], rel=1e-2)
