"""Transformer Engine's packed-sequence (THD) path: packed rows give the per-sample losses and
gradients of unpacked samples. Needs a GPU with Transformer Engine; skipped elsewhere (the CPU
tests in test_packing.py check the THD inputs against the block mask)."""

import importlib.util

import pytest
import torch

from sed_megatron.data.packing import packed_sample
from sed_megatron.data.simple import sample_from_tokens
from sed_megatron.loss import LossConfig, masked_sum_and_count, sft_token_loss
from sed_megatron.testing.models import tiny_gpt

from ..distributed import run_distributed
from .test_packing import SEQ, VOCAB, make_samples

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine")]


def _to_thd(batch):
    """Rows [b, s] -> one packed sequence [1, b*s] and its PackedSeqParams, as get_batch makes them at CP=1."""
    from sed_megatron.training.batch import (
        flatten_batch_for_packed_sequences,
        packed_seq_params,
    )

    batch = flatten_batch_for_packed_sequences(dict(batch))
    return {**batch, "packed_seq_params": packed_seq_params(batch)}


def _losses_and_grads(model, packed, cfg):
    model.zero_grad()
    sums = []
    if packed:
        row = packed_sample(make_samples(), SEQ, thd=True)
        batch = _to_thd({key: value.unsqueeze(0).cuda() for key, value in row.items()})
        params = batch["packed_seq_params"]
        logits = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params)
        loss, _ = sft_token_loss(logits.float(), batch["labels"], cfg)
        start = 0
        for ids, _ in make_samples():
            end = start + len(ids) - 1
            sums.append(masked_sum_and_count(loss[:, start:end], batch["loss_mask"][:, start:end])[0])
            start = end
    else:
        for ids, mask in make_samples():
            sample = {k: v.unsqueeze(0).cuda() for k, v in sample_from_tokens(ids, mask, len(ids) - 1).items()}
            logits = model(sample["tokens"], sample["position_ids"], None)  # TE applies the causal mask
            loss, _ = sft_token_loss(logits.float(), sample["labels"], cfg)
            sums.append(masked_sum_and_count(loss, sample["loss_mask"])[0])
    torch.stack(sums).sum().backward()
    return torch.stack(sums).detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def check_thd_equals_unpacked():
    model = tiny_gpt(vocab_size=VOCAB, max_sequence_length=SEQ, transformer_engine=True)
    cfg = LossConfig(kind="sed", tau=0.05, top_k=2)
    packed_losses, packed_grads = _losses_and_grads(model, True, cfg)
    losses, grads = _losses_and_grads(model, False, cfg)
    # bf16 activations, different kernels for one long and three short sequences: ~1e-2 relative.
    torch.testing.assert_close(packed_losses, losses, rtol=2e-2, atol=2e-2)
    for name in grads:
        error = (packed_grads[name] - grads[name]).norm() / grads[name].norm().clamp_min(1e-12)
        assert error < 3e-2, (name, float(error))


def test_thd_equals_unpacked():
    run_distributed(check_thd_equals_unpacked, world_size=1, device="cuda")
