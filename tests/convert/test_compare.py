"""compare_hf_mcore.py checks the mapping whatever the checkpoint's dtype, and fails in one line.

A bf16 checkpoint deep enough that bf16 rounding moves logits well past 1e-3: in fp32 (the
default) a correct conversion matches to summation-order rounding; in bf16 the tolerance comes
from transformers' own bf16-vs-fp32 difference; a wrong checkpoint fails with one stderr line.
"""

import re

import pytest
import torch

from .common import to_mcore, tool

# Whole processes (training, tools): the second phase of launch/run_tests.sh, beside the first.
pytestmark = pytest.mark.e2e


def deep_bf16_llama(directory, seed):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=160, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init: the logits reach a few units
        for param in model.parameters():
            param.mul_(4.0 if param.dim() > 1 else 1.0)
    model.to(torch.bfloat16).save_pretrained(directory)
    return str(directory)


def test_compare_in_fp32_and_bf16_and_a_failure(tmp_path):
    hf_dir = deep_bf16_llama(tmp_path / "hf", seed=0)
    ckpt = tmp_path / "ckpt"
    assert to_mcore(hf_dir, ckpt).dtype == "bfloat16"
    args = ["--hf-dir", hf_dir, "--load", ckpt, "--tp", "1"]

    fp32 = tool("compare_hf_mcore", *args)
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    # Both in fp32 from the same bf16 weights: summation order only.
    assert float(fp32.stdout.strip().splitlines()[-1].split("=")[1]) < 1e-4

    bf16 = tool("compare_hf_mcore", *args, "--compute-dtype", "bfloat16")
    assert bf16.returncode == 0, bf16.stdout[-2000:] + bf16.stderr[-3000:]
    *_, note, last = bf16.stdout.strip().splitlines()
    reference = float(re.search(r"bf16-vs-fp32 difference ([\d.e+-]+)", note).group(1))
    # Deep enough: transformers' own bf16 forward is far outside the fp32 tolerance, which is why
    # a bf16 comparison cannot use it.
    assert reference > 1e-2 and 0 < float(last.split("=")[1]) <= 2 * reference

    # Another model's checkpoint: the figure, the tolerance and the hint in one line, exit 1 (two
    # ranks started by the tool itself, no torchrun).
    other = deep_bf16_llama(tmp_path / "other", seed=1)
    wrong = tool("compare_hf_mcore", "--hf-dir", other, "--load", ckpt, "--tp", "2")
    assert wrong.returncode == 1, wrong.stderr[-3000:]
    assert wrong.stdout.strip().splitlines()[-1].startswith("max_abs_logit_diff=")
    errors = [line for line in wrong.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and re.match(r"compare_hf_mcore\.py: error: max_abs_logit_diff [\d.]+ exceeds the "
                                         r"tolerance 0\.001 \(float32\): the two models differ", errors[0]), errors
