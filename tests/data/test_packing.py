"""Packed rows: no cross-sample attention or targets; the same per-sample losses and gradients as unpacked."""

import torch

from sed_megatron.data.packing import pack_greedy, packed_sample
from sed_megatron.data.simple import sample_from_tokens
from sed_megatron.loss import IGNORE_INDEX, LossConfig, masked_sum_and_count, sft_token_loss
from sed_megatron.testing.distributed import run_distributed
from sed_megatron.testing.models import tiny_gpt

VOCAB, SEQ = 96, 24


def make_samples():
    gen = torch.Generator().manual_seed(7)
    samples = []
    for length, prompt in ((7, 3), (5, 2), (10, 4)):
        ids = torch.randint(0, VOCAB, (length,), generator=gen).tolist()
        samples.append((ids, [0] * prompt + [1] * (length - prompt)))
    return samples


def test_pack_greedy_keeps_order_and_limits():
    assert pack_greedy([7, 5, 10, 20, 3], seq_length=20) == [[0, 1, 2], [3], [4]]


def test_packed_row_layout():
    row = packed_sample(make_samples(), SEQ)
    assert row["position_ids"][:6].tolist() == list(range(6)) and row["position_ids"][6:10].tolist() == list(range(4))
    assert row["labels"][5].item() != IGNORE_INDEX and row["labels"][19:].tolist() == [IGNORE_INDEX] * 5
    mask = row["attention_mask"][0]
    assert mask[6, 5] and not mask[7, 6] and mask[6, 7]  # 2nd sample: blind to the 1st and to the future
    assert row["loss_mask"].sum().item() == (7 - 3) + (5 - 2) + (10 - 4)


def per_sample_losses_and_grads(model, packed, cfg):
    model.zero_grad()
    if packed:
        row = packed_sample(make_samples(), SEQ)
        batch = {key: value.unsqueeze(0) for key, value in row.items()}
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        loss, _ = sft_token_loss(logits, batch["labels"], cfg)
        sums, start = [], 0
        for ids, _ in make_samples():
            end = start + len(ids) - 1
            sums.append(masked_sum_and_count(loss[:, start:end], batch["loss_mask"][:, start:end])[0])
            start = end
    else:
        sums = []
        for ids, mask in make_samples():
            n = len(ids) - 1
            sample = {key: value.unsqueeze(0) for key, value in sample_from_tokens(ids, mask, n).items()}
            causal = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
            logits = model(sample["tokens"], sample["position_ids"], causal)
            loss, _ = sft_token_loss(logits, sample["labels"], cfg)
            sums.append(masked_sum_and_count(loss, sample["loss_mask"])[0])
    torch.stack(sums).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return torch.stack(sums).detach(), grads


def check_packed_equals_unpacked():
    model = tiny_gpt(vocab_size=VOCAB, max_sequence_length=SEQ)
    cfg = LossConfig(kind="sed", tau=0.05, top_k=2)
    packed_losses, packed_grads = per_sample_losses_and_grads(model, True, cfg)
    losses, grads = per_sample_losses_and_grads(model, False, cfg)
    # RoPE rotates the packed samples by a different absolute angle (same relative angles):
    # fp32 rounding only, ~1e-7 relative.
    torch.testing.assert_close(packed_losses, losses, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_equals_unpacked():
    run_distributed(check_packed_equals_unpacked, world_size=1)
