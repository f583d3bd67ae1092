"""The production paths on a GPU: NCCL, bf16, CUDA kernels (skipped without a GPU).

    python3 -m pytest -m gpu tests        # on a GPU machine, after tools/gpu_setup.sh

Each test runs the commands a user runs (torchrun, the converters) on whatever device the
runtime selects; SED_MEGATRON_GPU_TESTS_ON_CPU=1 runs them on the CPU layer instead, to check
the script itself before spending device time.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from ..training.launch import REPO, TINY, train

pytestmark = pytest.mark.gpu

THREE_STEPS = ["--tensor-model-parallel-size", "1", "--bf16", "--train-iters", "3", "--lr-warmup-iters", "0",
               "--log-interval", "1", "--eval-iters", "0", "--save-interval", "3"]


def _finite_records(records, count):
    assert [r["iteration"] for r in records] == list(range(1, count + 1))
    for r in records:
        for key in ("loss", "ce_loss", "grad_norm", "topk_mass", "p_target"):
            assert r[key] is not None and math.isfinite(r[key]), (key, r)


@pytest.mark.parametrize("impl,fused", [("local", False), ("transformer_engine", False), ("local", True)])
def test_three_bf16_iterations(tmp_path, impl, fused):
    """tiny_cpu.yaml (SED, tau calibrated on the initial model) at TP=1 in bf16, 3 iterations;
    fused: with the fused output-layer loss (its Triton kernels on a GPU)."""
    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine.pytorch")
    save = tmp_path / "ckpt"
    records = train(str(tmp_path), 1, [*THREE_STEPS, "--save", str(save), "--transformer-impl", impl,
                                       *(["--sft-fused-linear"] if fused else [])], torchrun=True)
    _finite_records(records, 3)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert json.loads((save / "sed_tau.json").read_text())["tau"] > 0


def test_convert_train_export(tmp_path):
    """A bf16 Llama: HF -> Megatron -> 3 bf16 SED steps -> HF; transformers runs the export."""
    from transformers import AutoModelForCausalLM

    from sed_megatron.testing.tiny_hf import tiny_hf_model

    hf_dir = tmp_path / "hf"
    tiny_hf_model("llama_gqa_untied", vocab_size=256).to(torch.bfloat16).save_pretrained(hf_dir)
    ckpt = tmp_path / "mcore"
    _tool("convert_hf_to_mcore.py", "--hf-dir", hf_dir, "--save", ckpt)
    trained = tmp_path / "trained"
    with open(TINY) as f:
        config = {k: v for k, v in yaml.safe_load(f).items() if k != "model"}  # the architecture: from --load
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    records = train(str(tmp_path / "run"), 1, [*THREE_STEPS, "--load", str(ckpt), "--finetune", "--no-load-optim",
                                               "--no-load-rng", "--save", str(trained), "--seq-length", "32"],
                    config=str(tmp_path / "run.yaml"), torchrun=True)
    _finite_records(records, 3)
    out = tmp_path / "exported"
    _tool("convert_mcore_to_hf.py", "--load", trained, "--save", out, "--hf-template", hf_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device)
    logits = model(torch.arange(16, device=device)[None]).logits
    assert torch.isfinite(logits.float()).all() and logits.shape == (1, 16, 256)


def _tool(name, *args):
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *map(str, args)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


@pytest.mark.parametrize("kind", ["ce", "dft", "sed", "gem"])
def test_fused_linear_loss_on_the_device(kind):
    """fused_linear_sft_loss in bf16 on the device (Triton kernels where they apply, 'auto')
    against the materialized logits and sft_token_loss: the loss sum and both gradients."""
    from sed_megatron.loss import LossConfig, fused_linear_sft_loss, masked_sum_and_count, sft_token_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    tokens, hidden_size, vocab = 1000, 256, 5003  # odd sizes: partial chunks and column blocks
    hidden = (torch.randn(tokens, 1, hidden_size, generator=gen) * 0.5).to(device, torch.bfloat16)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.05).to(device, torch.bfloat16)
    target = torch.randint(0, vocab, (tokens, 1), generator=gen).to(device)
    target[:100] = -100
    loss_mask = (target != -100).float()
    cfg = LossConfig(kind=kind, top_k=2, tau=0.05, lam=1.0)
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            loss_sum, _ = fused_linear_sft_loss(h, w, target, loss_mask, cfg, chunk_size=300)
        else:
            loss, _ = sft_token_loss((h @ w.t()).float(), target, cfg)
            loss_sum, _ = masked_sum_and_count(loss, loss_mask)
        loss_sum.backward()
        results.append((loss_sum.detach().float(), h.grad.float(), w.grad.float()))
    (want_sum, want_h, want_w), (got_sum, got_h, got_w) = results
    torch.testing.assert_close(got_sum, want_sum, rtol=2e-3, atol=1e-2)
    for got, want in ((got_h, want_h), (got_w, want_w)):  # bf16 gradients: a few roundings apart
        assert float((got - want).norm() / want.norm()) < 2e-2
