"""LoRA SFT end to end on the training entry point: a converted Llama, SED with calibrated tau,
the same curve at TP=1, at TP=2 x SP x CP=2 and at PP=2 x DP=2 (distributed optimizer) with
the fused output-layer loss; the base weights untouched; both exports (the contract commands)
against transformers + PEFT and against Megatron with its adapters."""

import functools
import json
import os
import shutil

import pytest
import torch

from ..convert.common import compare, convert, export, save_hf, to_mcore, training_config
from ..training.launch import train
from ..training.test_train import RTOL, TAU_RTOL, calibrated_tau

pytestmark = pytest.mark.e2e

ITERS = 5
RESUME_FROM = 3  # tp1 saves iterations 3 and 5
LORA_FLAGS = ["--lora-rank", "4", "--lora-alpha", "8", "--loss-type", "sed", "--sed-calibrate-ratio", "0.5",
              "--lr", "1e-2"]
LAYOUTS = {  # name -> (processes, flags)
    "tp1": (1, ["--tensor-model-parallel-size", "1"]),
    "tp2_sp_cp2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2"]),
    "pp2_dp2_fused": (4, ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
                          "--use-distributed-optimizer", "--sft-fused-linear", "--sft-fused-chunk-tokens", "37"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    hf_dir = save_hf(root / "hf", "llama_gqa_untied")
    base = str(root / "base")
    to_mcore(hf_dir, base)
    config = training_config(root)
    result = {"hf": hf_dir, "base": base, "config": config}
    for name, (nproc, flags) in LAYOUTS.items():
        run_dir = root / name
        save = ["--save", str(run_dir / "ckpt"), "--save-interval", str(RESUME_FROM)] if name == "tp1" else [
            "--save", ""]
        result[name] = train(str(run_dir), nproc, ["--load", base, "--finetune", "--no-load-optim", "--no-load-rng",
                                                   "--train-iters", str(ITERS), *LORA_FLAGS, *flags, *save],
                             config=config)
        result[f"{name}_log"] = str(run_dir / "train.log")
    result["ckpt"] = str(root / "tp1" / "ckpt")
    return result


def test_layouts_give_the_same_curve_and_only_adapters_train(runs):
    reference = runs["tp1"]
    assert len(reference) == ITERS and reference[-1]["loss"] < reference[0]["loss"]
    with open(runs["tp1_log"]) as f:
        log = f.read()
    # 2 layers x r (in + out) over q, k, v, o (64 in; 64, 32, 32, 64 out) and gate, up, down (64/96)
    assert "LoRA: rank 4, alpha 8 (scaling 2), q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj: " \
           f"{2 * 4 * (128 + 96 + 96 + 128 + 160 + 160 + 160):,} trainable parameters" in log
    for name in LAYOUTS:
        got = runs[name]
        assert [r["iteration"] for r in got] == [r["iteration"] for r in reference], name
        for key in ("loss", "ce_loss", "mask_rate", "grad_norm"):
            assert [r[key] for r in got] == pytest.approx([r[key] for r in reference], rel=RTOL, abs=1e-7), \
                f"{name}: {key}"
        # tau calibrated on the base (the adapters are zero before the first step), whatever the layout
        assert calibrated_tau(runs[f"{name}_log"]) == pytest.approx(calibrated_tau(runs["tp1_log"]), rel=TAU_RTOL)
    with open(os.path.join(runs["ckpt"], "sed_megatron_lora.json")) as f:
        assert json.load(f) == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "use_rslora": False, "base": runs["base"],
                                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]}


def test_resume_at_another_layout_continues_the_curve(runs, tmp_path):
    """Iteration 3 of the TP=1 LoRA run (adapters, their optimizer state, the data position), resumed
    at TP=2: the same steps 4 and 5 (another reduction order: RTOL)."""
    resumed = train(str(tmp_path / "resumed"), 2, ["--load", runs["ckpt"], "--ckpt-step", str(RESUME_FROM),
                                                   "--train-iters", str(ITERS), *LORA_FLAGS,
                                                   "--tensor-model-parallel-size", "2", "--sequence-parallel"],
                    config=runs["config"])
    assert [r["iteration"] for r in resumed] == [4, 5]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in runs["tp1"][RESUME_FROM:]], rel=RTOL)


def test_checkpoints_hold_the_adapters_and_name_their_base(runs, tmp_path):
    """The LoRA checkpoint stores adapters (and their optimizer state) only; the base is read from
    the checkpoint its sed_megatron_lora.json names, and a base that moved stops with one line."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = list(FileSystemReader(os.path.join(runs["ckpt"], f"iter_{ITERS:07d}")).read_metadata().state_dict_metadata)
    weights = [k for k in keys if k.startswith(("decoder.", "embedding.", "output_layer."))]
    assert weights and all("_lora." in k for k in weights), weights
    assert any("_lora." in k and "exp_avg" in k for k in keys)  # the adapters' Adam moments
    moved = shutil.copytree(runs["ckpt"], tmp_path / "lora")
    with open(moved / "sed_megatron_lora.json") as f:
        fields = json.load(f)
    with open(moved / "sed_megatron_lora.json", "w") as f:
        json.dump({**fields, "base": str(tmp_path / "gone")}, f)
    out = export(str(moved), str(tmp_path / "out"))
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].endswith(
        f"its base checkpoint '{tmp_path / 'gone'}' is not there (moved? set `base` in that file to where it is now)")


def test_adapter_and_merged_exports_agree_with_peft_and_megatron(runs, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    adapter, merged = str(tmp_path / "adapter"), str(tmp_path / "merged")
    for out in (export(runs["ckpt"], adapter, "--adapter-only", "--hf-template", runs["hf"]),
                export(runs["ckpt"], merged, "--hf-template", runs["hf"])):
        assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == runs["hf"]
    tokens = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        load = functools.partial(AutoModelForCausalLM.from_pretrained, dtype=torch.float32)
        original = load(runs["hf"]).eval()(tokens).logits
        with_adapter = peft.PeftModel.from_pretrained(load(runs["hf"]), adapter).eval()(tokens).logits
        merged_logits = load(merged).eval()(tokens).logits
    assert (merged_logits - original).abs().max() > 1e-3  # the adapters trained
    # fp32; the merged weights hold W + s B A rounded once, PEFT adds s B (A x): ~1e-6
    torch.testing.assert_close(with_adapter, merged_logits, atol=2e-5, rtol=1e-4)
    # Megatron with its adapters (the checkpoint as trained) against the merged export
    assert compare(merged, runs["ckpt"]) < 1e-4


def test_adapter_only_needs_a_lora_checkpoint(runs, tmp_path):
    out = export(runs["base"], str(tmp_path / "adapter"), "--adapter-only")
    assert out.returncode == 2 and not os.path.exists(tmp_path / "adapter")
    assert out.stderr.strip().splitlines()[-1].endswith(
        "no sed_megatron_lora.json: --adapter-only exports the adapters of a run trained with --lora-rank")


def test_an_exported_adapter_imports_and_exports_again_bit_identical(runs, tmp_path):
    """adapter -> (with its base) a LoRA checkpoint -> adapter: the same tensors and settings."""
    from safetensors.torch import load_file

    first, again = tmp_path / "adapter", tmp_path / "again"
    assert export(runs["ckpt"], str(first), "--adapter-only", "--hf-template", runs["hf"]).returncode == 0
    imported = str(tmp_path / "imported")
    done = convert(runs["hf"], imported, "--adapter", str(first))
    assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(imported, "sed_megatron_lora.json")) as f:
        assert json.load(f)["rank"] == 4
    assert export(imported, str(again), "--adapter-only", "--hf-template", runs["hf"]).returncode == 0
    a, b = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (first, again))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    with open(first / "adapter_config.json") as f, open(again / "adapter_config.json") as g:
        assert json.load(f) == json.load(g)
    # Training continues from it (the trained adapters: below the first loss of the run that trained them).
    continued = train(str(tmp_path / "continued"), 1, ["--load", imported, "--finetune", "--no-load-optim",
                                                        "--no-load-rng", "--train-iters", "1", *LORA_FLAGS,
                                                        "--sed-tau", "0.5"], config=runs["config"])
    assert continued[0]["ce_loss"] < runs["tp1"][0]["ce_loss"]
