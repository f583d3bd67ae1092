"""The production paths on a GPU: NCCL, bf16, the fused loss's GEMMs and Triton kernels, agreement
with independent references (skipped without a GPU).

    OUT=DIR bash tools/gpu_check.sh        # on a GPU machine: installs, runs these, benchmarks
    python3 -m pytest -m gpu tests         # these alone, once installed

Each check compares with a reference, never only "the values are finite":
- the fused output-layer loss (every kind, both gradient schemes, Triton where it applies) against
  the materialized logits and sft_token_loss on the device, and its fp32-accumulating weight-
  gradient GEMM against float64;
- 3 bf16 training iterations on the device against the same run in fp32 on the CPU;
- a converted bf16 model's logits, and those of its export after 3 bf16 steps, against
  transformers on the device (tools/compare_hf_mcore.py); the same with LoRA (both layer
  implementations) against its merged export.
SED_MEGATRON_GPU_TESTS_ON_CPU=1 runs them on the CPU layer instead (tools/gpu_check.sh's dry run).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from ..training.launch import REPO, TINY, read_metrics, train

pytestmark = pytest.mark.gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Megatron's own distributed timeout: a hung collective ends the test, not the whole check.
THREE_STEPS = ["--tensor-model-parallel-size", "1", "--train-iters", "3", "--lr-warmup-iters", "0",
               "--log-interval", "1", "--eval-iters", "0", "--save-interval", "3", "--distributed-timeout-minutes", "2",
               "--use-cpu-initialization"]  # the CPU's generator initializes the weights: the same model on both

BF16_LOSS_RTOL, BF16_GRAD_NORM_RTOL = 5e-3, 2e-2
"""3 iterations of the tiny model (h = 64, V = 256) in bf16 against fp32, from the same initial
weights and batches: bf16 rounds the weights, activations and logits (2^-9 relative), and the
runs drift apart a little with each step. Measured on the CPU layer: loss 6e-4, gradient norm
2e-5 at iteration 1 and 2e-3 after. The gradient norm of the first iteration depends on the
initial model alone, so a lost or wrong gradient (the output layer's, say) moves it by far more
than 2e-2; the loss falls by ~1.2 % over the 3 iterations, so a run that does not learn misses
5e-3."""


def _records(tmp_path, name, flags, env=None):
    """Train the tiny model with flags; the metrics records."""
    run_dir = tmp_path / name
    if env is None:
        return train(str(run_dir), 1, flags, torchrun=True)
    os.makedirs(run_dir, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    own_save = [] if "--save" in flags else ["--save", str(run_dir / "save")]  # not the checkout's runs/tiny_cpu
    out = subprocess.run([sys.executable, "-m", "sed_megatron.train", "--config", TINY, "--metrics-file", str(metrics),
                          *own_save, *flags], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TORCHDYNAMO_DISABLE": "1", **env})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return read_metrics(metrics)


@pytest.mark.parametrize("impl,fused", [("local", False), ("transformer_engine", False), ("local", True)])
def test_three_bf16_iterations_follow_the_fp32_cpu_run(tmp_path, impl, fused):
    """tiny_cpu.yaml (SED, tau calibrated on the initial model) at TP=1: 3 bf16 iterations on the
    device, then the same 3 in fp32 on the CPU; fused: with the fused output-layer loss (its
    Triton kernels on a GPU)."""
    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine.pytorch")
    extra = ["--sft-fused-linear"] if fused else []
    save = tmp_path / "ckpt"
    device_records = _records(tmp_path, "device", [*THREE_STEPS, "--bf16", "--save", str(save), "--transformer-impl",
                                                   impl, *extra])
    assert [r["iteration"] for r in device_records] == [1, 2, 3]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    tau = json.loads((save / "sed_tau.json").read_text())["tau"]
    cpu_records = _records(tmp_path, "cpu", [*THREE_STEPS, "--transformer-impl", "local", *extra],
                           env={"SED_MEGATRON_DEVICE": "cpu"})
    for device_record, cpu_record in zip(device_records, cpu_records, strict=True):
        for key, rtol in (("loss", BF16_LOSS_RTOL), ("ce_loss", BF16_LOSS_RTOL), ("grad_norm", BF16_GRAD_NORM_RTOL)):
            torch.testing.assert_close(device_record[key], cpu_record[key], rtol=rtol, atol=0,
                                       msg=f"iteration {cpu_record['iteration']} {key}")
        assert abs(device_record["mask_rate"] - cpu_record["mask_rate"]) <= 0.05  # tau calibrated in bf16 vs fp32
    assert 0 < tau <= 1


def test_convert_compare_train_export_on_the_device(tmp_path):
    """A bf16 Llama: HF -> Megatron, whose logits on the device equal transformers' on the device
    (fp32 compute); 3 bf16 SED steps; the export, whose logits equal the trained checkpoint's."""
    from sed_megatron.testing.tiny_hf import tiny_hf_model

    hf_dir = tmp_path / "hf"
    tiny_hf_model("llama_gqa_untied", vocab_size=256).to(torch.bfloat16).save_pretrained(hf_dir)
    ckpt = tmp_path / "mcore"
    _tool("convert_hf_to_mcore.py", "--hf-dir", hf_dir, "--save", ckpt)
    _compare(hf_dir, ckpt)
    trained = tmp_path / "trained"
    with open(TINY) as f:
        config = {k: v for k, v in yaml.safe_load(f).items() if k != "model"}  # the architecture: from --load
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    records = train(str(tmp_path / "run"), 1, [*THREE_STEPS, "--bf16", "--load", str(ckpt), "--finetune",
                                               "--no-load-optim", "--no-load-rng", "--save", str(trained),
                                               "--seq-length", "32"],
                    config=str(tmp_path / "run.yaml"), torchrun=True)
    assert [r["iteration"] for r in records] == [1, 2, 3] and records[-1]["loss"] != records[0]["loss"]
    out = tmp_path / "exported"
    _tool("convert_mcore_to_hf.py", "--load", trained, "--save", out, "--hf-template", hf_dir)
    _compare(out, trained)


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_lora_trains_and_exports_on_the_device(tmp_path, impl):
    """LoRA on a bf16 Llama with each layer implementation (TE: its fused norm + linear hands the
    adapters the normed input): 3 bf16 SED steps that move the loss, then the merged export, whose
    logits on the device equal Megatron's with its adapters (tools/compare_hf_mcore.py)."""
    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine.pytorch")
    from sed_megatron.testing.tiny_hf import tiny_hf_model

    hf_dir = tmp_path / "hf"
    tiny_hf_model("llama_gqa_untied", vocab_size=256).to(torch.bfloat16).save_pretrained(hf_dir)
    ckpt, trained = tmp_path / "mcore", tmp_path / "lora"
    _tool("convert_hf_to_mcore.py", "--hf-dir", hf_dir, "--save", ckpt)
    with open(TINY) as f:
        config = {k: v for k, v in yaml.safe_load(f).items() if k != "model"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    records = train(str(tmp_path / "run"), 1, [*THREE_STEPS, "--bf16", "--load", str(ckpt), "--finetune",
                                               "--no-load-optim", "--no-load-rng", "--save", str(trained),
                                               "--seq-length", "32", "--transformer-impl", impl, "--lora-rank", "8",
                                               "--lora-alpha", "16", "--lr", "1e-2"],
                    config=str(tmp_path / "run.yaml"), torchrun=True)
    assert [r["iteration"] for r in records] == [1, 2, 3] and records[-1]["loss"] < records[0]["loss"]
    out = tmp_path / "merged"  # in fp32: a bf16 merge rounds W + s B A once more (~2e-3 on these logits)
    _tool("convert_mcore_to_hf.py", "--load", trained, "--save", out, "--hf-template", hf_dir, "--dtype", "float32")
    _compare(out, trained)


def _tool(name, *args):
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *map(str, args)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def _compare(hf_dir, load):
    """tools/compare_hf_mcore.py: Megatron and transformers on the device, fp32; exit 0 within its tolerance."""
    last = _tool("compare_hf_mcore.py", "--hf-dir", hf_dir, "--load", load, "--tp", "1").strip().splitlines()[-1]
    assert last.startswith("max_abs_logit_diff="), last


def _fused_inputs(dtype):
    """A realistic shape on a GPU (8192 tokens x 1024 x a 32003-id shard: partial chunks), a small one on the CPU."""
    tokens, hidden_size, vocab = (8192, 1024, 32003) if DEVICE == "cuda" else (300, 64, 1003)
    gen = torch.Generator().manual_seed(3)
    hidden = (torch.randn(tokens, 1, hidden_size, generator=gen) * 0.5).to(DEVICE, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.05).to(DEVICE, dtype)
    target = torch.randint(0, vocab, (tokens, 1), generator=gen).to(DEVICE)
    target[: tokens // 10] = -100  # a prompt
    return hidden, weight, target, (target != -100).float()


@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("kind", ["ce", "dft", "sed", "gem"])
def test_fused_loss_agrees_with_the_materialized_path(kind, grad_in_forward):
    """fused_linear_sft_loss in bf16 on the device (Triton kernels where they apply, 'auto'), its
    weight gradient into an fp32 main_grad as in training, against the materialized bf16 logits
    and sft_token_loss: the loss sum, the hidden gradient and the weight gradient.

    Tolerance: both paths see bf16 logits from the same GEMM (chunked or not), so the loss sums
    agree to fp32 summation order (rtol 2e-3); the gradients pass through bf16 roundings of G and
    the GEMM outputs in a different order: relative L2 error 2e-2 (test_fused_linear.py's bf16
    analysis bounds it near 5e-3 per entry)."""
    from sed_megatron.loss import LossConfig, fused_linear_sft_loss, masked_sum_and_count, sft_token_loss

    hidden, weight, target, loss_mask = _fused_inputs(torch.bfloat16)
    cfg = LossConfig(kind=kind, top_k=2, tau=0.05 if kind == "sed" else None, lam=1.0)
    results = []
    for fused in (False, True):
        h = hidden.clone().requires_grad_()
        w = torch.nn.Parameter(weight.clone())
        w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=DEVICE)
        w.grad_added_to_main_grad = False
        if fused:
            loss_sum, _ = fused_linear_sft_loss(h, w, target, loss_mask, cfg, gradient_accumulation_fusion=True,
                                                grad_in_forward=grad_in_forward)
            loss_sum.backward()
            weight_grad = w.main_grad
        else:
            loss, _ = sft_token_loss(h @ w.t(), target, cfg)
            loss_sum, _ = masked_sum_and_count(loss, loss_mask)
            loss_sum.backward()
            weight_grad = w.grad.float()
        results.append((loss_sum.detach().float(), h.grad.float(), weight_grad))
    (want_sum, want_h, want_w), (got_sum, got_h, got_w) = results
    torch.testing.assert_close(got_sum, want_sum, rtol=2e-3, atol=1e-2)
    for name, got, want in (("hidden", got_h, want_h), ("weight", got_w, want_w)):
        error = float((got - want).norm() / want.norm())
        assert error < 2e-2, (name, error)


def test_weight_gradient_gemm_accumulates_in_fp32():
    """main_grad += G^T @ hidden with bf16 operands: the product is accumulated in fp32 (apex, or
    torch's fp32-output GEMM), not rounded to bf16 first. Against float64 of the same bf16 values:
    fp32 accumulation errs by ~1e-6 relative; a bf16 result would err by ~2e-3."""
    from sed_megatron.loss.fused_linear import _accumulate_weight_grad_

    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(512, 4096, generator=gen).to(DEVICE, torch.bfloat16)  # [c, V/tp]
    hidden = torch.randn(512, 256, generator=gen).to(DEVICE, torch.bfloat16)  # [c, h]
    before = torch.randn(4096, 256, generator=gen).to(DEVICE)
    main_grad = before.clone()
    _accumulate_weight_grad_(main_grad, grad, hidden)
    expected = before.double() + grad.double().t() @ hidden.double()
    error = float((main_grad.double() - expected).norm() / (expected - before.double()).norm())
    assert main_grad.dtype == torch.float32 and error < 1e-4, error
