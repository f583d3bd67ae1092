"""sft_token_loss at TP=1, 2 and 4 against the float64 reference (values, gradients, stats, masks).

Tolerances, fp32 logits: the loss works in fp32, so a per-token value (a log-sum-exp of up to a
few hundred terms, magnitude <= ~15) carries ~1e-6 absolute error: atol 2e-5. Gradient
entries are probabilities (<= 1) times a per-token factor (<= ~3): atol 2e-6.
bf16 logits: the reference sees the same bf16 values, so values keep the fp32 tolerance; the
gradient is returned in bf16, whose rounding is 2^-9 relative: rtol 4e-3.
"""

import itertools

import pytest
import torch

from sed_megatron.loss import IGNORE_INDEX, LossConfig, sft_token_loss

from ..distributed import run_distributed
from .reference import reference_loss

NEAR_TAU = 1e-5
"""Tokens whose reference top-k mass lies this close to tau are left out of exact comparisons:
fp32 and float64 may decide P_topk < tau differently there, and the penalty then differs."""

SEQ, BATCH = 7, 3
VOCAB_SIZES = (4 * 53, 12)  # not powers of two; 12 at TP=4 gives 3-id shards, fewer than k=5
DTYPES = (torch.float32, torch.bfloat16)
TOP_KS = (1, 2, 5)
VARIANTS = {  # name -> (kind, LossConfig fields beyond the defaults); SED's tau comes from the data
    "ce": ("ce", {}),
    "dft": ("dft", {}),
    "sed": ("sed", {}),
    "sed/mask=none": ("sed", {"mask": "none"}),
    "gem": ("gem", {}),
    "gem/h=logsigmoid": ("gem", {"gem_h": "logsigmoid"}),
}


def make_inputs(vocab_size, dtype, seed):
    """Logits with varied sharpness (so top-k masses spread over (0, 1]) and targets on every shard."""
    gen = torch.Generator().manual_seed(seed)
    sharpness = torch.tensor([0.3, 1.0, 3.0, 8.0])[torch.randint(0, 4, (SEQ, BATCH, 1), generator=gen)]
    logits = (torch.randn(SEQ, BATCH, vocab_size, generator=gen, dtype=torch.float64) * sharpness).to(dtype)
    target = torch.randint(0, vocab_size, (SEQ, BATCH), generator=gen)
    flat = target.view(-1)
    for shard in range(4):  # one target in each quarter, i.e. on every shard up to TP=4
        flat[shard] = shard * vocab_size // 4 + 1
    flat[4] = vocab_size - 1  # the last id
    flat[5] = 0
    flat[6] = int(logits.view(-1, vocab_size)[6].float().argmax())  # target is the argmax
    flat[7] = IGNORE_INDEX
    flat[-1] = IGNORE_INDEX
    weights = torch.rand(SEQ, BATCH, generator=gen, dtype=torch.float64) + 0.5  # as grad_output
    return logits, target, weights


def reference_and_config(logits, target, variant, top_k):
    kind, fields = VARIANTS[variant]
    full = logits.double().requires_grad_()
    tau = None
    if kind == "sed" and fields.get("mask", "topk_mass") == "topk_mass":
        # tau at the 0.3 quantile of the reference top-k mass (paper: r = 0.7 left unpenalized).
        masses = torch.softmax(full.detach(), -1).topk(top_k, -1).values.sum(-1)[target != IGNORE_INDEX]
        tau = min(1.0, float(torch.quantile(masses, 0.3)))
    cfg = LossConfig(kind=kind, top_k=top_k, tau=tau, lam=1.0, **fields)
    ref_loss, ref_stats = reference_loss(full, target, kind, top_k=top_k, tau=tau, lam=1.0, **fields)
    return cfg, full, ref_loss, ref_stats


def clear_of_tau(ref_stats, cfg):
    if cfg.kind != "sed" or cfg.mask == "none":
        return torch.ones_like(ref_stats["ce"], dtype=torch.bool)
    return (ref_stats["topk_mass"] - cfg.tau).abs() > NEAR_TAU


def check_case(vocab_size, dtype, top_k, variant, tp_group, rank, world_size, seed, padding=0):
    """padding > 0: the logits carry that many extra ids (embedding rows added for TP)."""
    logits, target, weights = make_inputs(vocab_size, dtype, seed)
    cfg, full, ref_loss, ref_stats = reference_and_config(logits, target, variant, top_k)
    (ref_loss * weights).sum().backward()
    if padding:
        junk = torch.randn(*logits.shape[:-1], padding, generator=torch.Generator().manual_seed(seed)) * 10
        logits = torch.cat([logits, junk.to(logits.dtype)], dim=-1)  # large: must not count

    shard_size = (vocab_size + padding) // world_size
    lo, hi = rank * shard_size, (rank + 1) * shard_size
    shard = logits[..., lo:hi].clone().requires_grad_()
    with_entropy = seed % 2 == 0  # both the single-pass and the chunked exponential
    loss, stats = sft_token_loss(shard, target, cfg, tp_group, with_entropy=with_entropy,
                                 vocab_size=vocab_size if padding else None)
    (loss * weights.float()).sum().backward()
    # The standard stats, the entropy when asked for, and the kind's own reports (SED: penalty).
    assert set(stats) == (set(ref_stats) if with_entropy else set(ref_stats) - {"entropy"}), set(stats)

    clear = clear_of_tau(ref_stats, cfg)
    where = f"V={vocab_size} {dtype} k={top_k} {variant} rank {rank}/{world_size}"
    assert loss.dtype == torch.float32 and loss.shape == target.shape, where
    torch.testing.assert_close(loss.double()[clear], ref_loss.detach()[clear], atol=2e-5, rtol=1e-5, msg=where)
    for name, ref_value in ref_stats.items():
        if name not in stats:
            continue
        value = stats[name].double()
        torch.testing.assert_close(value[clear], ref_value[clear], atol=2e-5, rtol=1e-5, msg=f"{where} {name}")
    assert torch.equal(stats["mask"][clear].bool(), ref_stats["mask"][clear].bool()), where
    if cfg.kind == "sed" and cfg.mask == "topk_mass":
        assert 0 < stats["mask"].sum() < (target != IGNORE_INDEX).sum(), f"{where}: tau splits no token"

    ref_grad = torch.cat([full.grad, full.grad.new_zeros(*full.shape[:-1], padding)], dim=-1)[..., lo:hi]
    if dtype == torch.bfloat16:
        assert shard.grad.dtype == torch.bfloat16, where
        torch.testing.assert_close(shard.grad.double()[clear], ref_grad[clear], atol=1e-6, rtol=4e-3, msg=where)
    else:
        torch.testing.assert_close(shard.grad.double()[clear], ref_grad[clear], atol=2e-6, rtol=1e-5, msg=where)
    ignored = target == IGNORE_INDEX
    assert torch.all(loss[ignored] == 0) and torch.all(shard.grad[ignored] == 0), f"{where}: ignored target"

    # The same tokens at TP=1 in this process: equal values and identical mask decisions.
    single = logits.clone().requires_grad_()
    single_loss, single_stats = sft_token_loss(single, target, cfg, None, vocab_size=vocab_size if padding else None)
    torch.testing.assert_close(loss[clear], single_loss[clear], atol=2e-5, rtol=1e-5, msg=where)
    assert torch.equal(stats["mask"][clear], single_stats["mask"][clear]), where


def all_cases():
    return list(itertools.product(VOCAB_SIZES, DTYPES, TOP_KS, VARIANTS))


# (vocab, padding): at TP=4 the 12-id logits have 3-id shards, so the last shard is all
# padding and the one before it half; 212 + 4 splits the padding onto the last shard only.
PADDED = ((9, 3), (212, 4))


def check_all_cases(world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group() if world_size > 1 else None
    rank = dist.get_rank(group=tp_group) if tp_group is not None else 0
    for seed, (vocab_size, dtype, top_k, variant) in enumerate(all_cases()):
        check_case(vocab_size, dtype, top_k, variant, tp_group, rank, world_size, seed)
    for seed, ((vocab_size, padding), variant) in enumerate(itertools.product(PADDED, VARIANTS)):
        check_case(vocab_size, torch.float32, 2, variant, tp_group, rank, world_size, seed, padding)


@pytest.mark.parametrize("vocab_size,dtype,top_k,variant", all_cases())
def test_single_process_matches_reference(vocab_size, dtype, top_k, variant):
    check_case(vocab_size, dtype, top_k, variant, None, 0, 1, seed=all_cases().index((vocab_size, dtype, top_k, variant)))


@pytest.mark.parametrize("vocab_padding,variant", list(itertools.product(PADDED, VARIANTS)))
def test_single_process_padding_ids_are_not_tokens(vocab_padding, variant):
    vocab_size, padding = vocab_padding
    check_case(vocab_size, torch.float32, 2, variant, None, 0, 1, seed=5, padding=padding)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_reference(tp):
    run_distributed(check_all_cases, world_size=tp, tp=tp, args=(tp,))
