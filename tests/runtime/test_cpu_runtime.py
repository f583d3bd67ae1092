"""The CPU layer: Megatron's GPTModel trains at TP=2 over gloo as at TP=1."""

import os
import tempfile

import torch

from sed_megatron.testing.models import tiny_gpt

from ..distributed import run_distributed

VOCAB, SEQ, BATCH = 96, 16, 2


def gpt_loss_and_grad_norm(tp):
    """Loss of a fixed batch and the global L2 norm of the gradient, reduced over TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    model = tiny_gpt(vocab_size=VOCAB, max_sequence_length=SEQ, tp=tp)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1).expand(BATCH, 1, SEQ, SEQ)
    loss = model(tokens, position_ids, causal, labels=labels).mean()
    loss.backward()
    squares = torch.zeros(1)
    for param in model.parameters():
        duplicated = not getattr(param, "tensor_model_parallel", False)
        if duplicated and parallel_state.get_tensor_model_parallel_rank() > 0:
            continue  # replicated across TP: count it once
        squares += param.grad.float().pow(2).sum()
    if tp > 1:
        dist.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
    return float(loss), float(squares.sqrt())


def check_gpt_tp_matches(tp, expected_path):
    import torch.distributed as dist

    loss, grad_norm = gpt_loss_and_grad_norm(tp)
    if dist.get_rank() == 0:
        torch.save((loss, grad_norm), expected_path)


def test_gpt_model_tp2_matches_tp1():
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for tp in (1, 2):
            path = os.path.join(tmp, f"tp{tp}.pt")
            run_distributed(check_gpt_tp_matches, world_size=tp, tp=tp, args=(tp, path))
            results.append(torch.load(path))
    (loss1, norm1), (loss2, norm2) = results
    # CPU initialization builds the full master weight from one seed and splits it, so TP=1
    # and TP=2 hold the same model; fp32 sums in another order differ by ~1e-6 relative.
    assert abs(loss1 - loss2) <= 1e-5 * abs(loss1), (loss1, loss2)
    assert abs(norm1 - norm2) <= 1e-4 * norm1, (norm1, norm2)
    assert loss1 > 0 and norm1 > 0
