"""The gradient identity the loss relies on, input validation, and the masked reducer."""

import pytest
import torch

from sed_megatron.loss import IGNORE_INDEX, LossConfig, masked_token_mean, sft_token_loss

from ..distributed import run_distributed


def test_gradient_identity_float64():
    """d/dz [CE + lam M (p - .5)^2] = (1 - 2 lam M p (p - .5)) (softmax - onehot); d/dz [sg(p) CE] = p (softmax - onehot)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        z = (torch.randn(50, generator=gen, dtype=torch.float64) * 3).requires_grad_()
        y = int(torch.randint(0, 50, (1,), generator=gen))
        lam, mask = float(torch.rand(1, generator=gen) * 3), float(torch.randint(0, 2, (1,), generator=gen))
        ce = -torch.log_softmax(z, -1)[y]
        p = torch.exp(-ce)
        (sed_grad,) = torch.autograd.grad(ce + lam * mask * (p - 0.5) ** 2, z, retain_graph=True)
        (dft_grad,) = torch.autograd.grad(p.detach() * ce, z)
        ce_grad = torch.softmax(z.detach(), -1) - torch.nn.functional.one_hot(torch.tensor(y), 50)
        p = p.detach()
        torch.testing.assert_close(sed_grad, (1 - 2 * lam * mask * p * (p - 0.5)) * ce_grad, atol=1e-14, rtol=0)
        torch.testing.assert_close(dft_grad, p * ce_grad, atol=1e-14, rtol=0)


def test_gem_reduces_to_linear_form():
    """GEM (linear h): -sum_j q_j (log p_y - log p_j) = sum_j q_j z_j - z_y, gradient q - onehot."""
    z = (torch.randn(4, 1, 30, dtype=torch.float64) * 2).requires_grad_()
    y = torch.tensor([[3], [0], [29], [7]])
    loss, _ = sft_token_loss(z.float().detach().requires_grad_(), y, LossConfig(kind="gem", gem_beta=0.5))
    q = torch.softmax(z.detach() / 0.5, -1)
    linear = (q * z.detach()).sum(-1) - z.detach().gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(loss.double(), linear, atol=1e-5, rtol=1e-5)


def test_lam_zero_is_ce_and_tau_one_with_mask_none():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 2, 40, generator=gen)
    target = torch.randint(0, 40, (5, 2), generator=gen)
    ce, _ = sft_token_loss(logits, target, LossConfig(kind="ce"))
    sed0, _ = sft_token_loss(logits, target, LossConfig(kind="sed", tau=0.5, lam=0.0))
    torch.testing.assert_close(sed0, ce, atol=0, rtol=0)
    # Top-2 mass of 40 random logits is < 1, so tau = 1 penalizes every token: mask = none.
    tau_one, stats = sft_token_loss(logits, target, LossConfig(kind="sed", tau=1.0))
    none, _ = sft_token_loss(logits, target, LossConfig(kind="sed", mask="none"))
    torch.testing.assert_close(tau_one, none, atol=0, rtol=0)
    assert torch.all(stats["mask"] == 1)


def test_inplace_matches_and_reuses_storage():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(6, 2, 33, generator=gen, requires_grad=True)
    target = torch.randint(0, 33, (6, 2), generator=gen)
    cfg = LossConfig(kind="sed", tau=0.3)
    results = []
    for inplace in (False, True):
        logits = base * 1.0  # a non-leaf, as the output layer's logits are
        before = logits.detach().clone()
        loss, _ = sft_token_loss(logits, target, cfg, inplace=inplace)
        (grad,) = torch.autograd.grad(loss.sum(), base)
        results.append((loss, grad))
        assert torch.equal(logits.detach(), before) != inplace  # only inplace=True overwrites
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(kind="xent"), "LossConfig.kind"),
        (dict(mask="entropy"), "LossConfig.mask"),
        (dict(top_k=0), "LossConfig.top_k"),
        (dict(lam=-0.1), "LossConfig.lam"),
        (dict(kind="sed", tau=0.0), "LossConfig.tau"),
        (dict(kind="sed", tau=1.5), "LossConfig.tau"),
        (dict(kind="sed"), "needs tau"),
        (dict(kind="gem", gem_beta=0.0), "LossConfig.gem_beta"),
        (dict(kind="gem", gem_h="sigmoid"), "LossConfig.gem_h"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


@pytest.mark.parametrize(
    "logits,target,cfg,error,message",
    [
        (torch.zeros(2, 1, 8), torch.zeros(2, 1, dtype=torch.int64), LossConfig(top_k=9), ValueError, "exceeds the vocabulary size 8"),
        (torch.zeros(2, 1, 8), torch.zeros(2, 1, dtype=torch.int32), LossConfig(), TypeError, "int64"),
        (torch.zeros(2, 1, 8), torch.zeros(2, 2, dtype=torch.int64), LossConfig(), ValueError, "does not match"),
        (torch.zeros(2, 1, 8), torch.tensor([[3], [8]]), LossConfig(), ValueError, "target id 8"),
        (torch.zeros(2, 1, 8), torch.tensor([[3], [-5]]), LossConfig(), ValueError, "target id -5"),
        (torch.zeros(8), torch.zeros((), dtype=torch.int64), LossConfig(), ValueError, r"\[s, b, V/tp\] or \[b, s, V/tp\]"),
    ],
)
def test_input_errors(logits, target, cfg, error, message):
    with pytest.raises(error, match=message):
        sft_token_loss(logits, target, cfg)


def test_masked_mean_all_masked_is_zero_not_nan():
    values = torch.randn(4, 2, requires_grad=True)
    mean = masked_token_mean(values, torch.zeros(4, 2))
    mean.backward()
    assert mean.item() == 0.0 and torch.all(values.grad == 0)


def test_ignored_targets_only_give_zero_loss_and_gradient():
    logits = torch.randn(3, 2, 10, requires_grad=True)
    target = torch.full((3, 2), IGNORE_INDEX)
    for kind in ("ce", "dft", "sed", "gem"):
        loss, stats = sft_token_loss(logits, target, LossConfig(kind=kind, mask="none"))
        mean = masked_token_mean(loss, target != IGNORE_INDEX)
        (grad,) = torch.autograd.grad(mean, logits)
        assert mean.item() == 0.0 and torch.all(grad == 0) and torch.all(stats["mask"] == 0)


def check_masked_mean_over_group():
    import torch.distributed as dist

    rank = dist.get_rank()
    values = torch.arange(6, dtype=torch.float32).view(3, 2) + 10 * rank
    mask = torch.ones(3, 2) if rank == 0 else torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    share = masked_token_mean(values, mask, group=dist.group.WORLD)
    dist.all_reduce(share)
    expected = (0 + 1 + 2 + 3 + 4 + 5 + 10) / 7  # rank 1 contributes only its first token
    assert abs(share.item() - expected) < 1e-6, share.item()


def test_masked_mean_weights_tokens_not_ranks():
    run_distributed(check_masked_mean_over_group, world_size=2)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_local_topk_candidates_equal_torch_topk_with_ties(top_k):
    """The k = 2 path (max, blank it, max again) against torch.topk: ties count once each, rows of
    one real id, and the buffer is left bit for bit as it was."""
    from sed_megatron.loss.math import local_topk_candidates

    gen = torch.Generator().manual_seed(2)
    values = torch.randn(6, 9, generator=gen)
    values[0, [2, 5]] = 4.0  # a tie for the max
    values[1] = 1.5  # all equal
    values[2, 3] = float("-inf")
    before = values.clone()
    got = local_topk_candidates(values, top_k, 9)
    assert torch.equal(values, before)
    torch.testing.assert_close(got.sort(-1).values, values.topk(top_k, -1).values.sort(-1).values, atol=0, rtol=0)
    one_id = local_topk_candidates(values[:, :1], top_k, 9)  # a shard with one real id: -inf candidates after it
    assert torch.equal(one_id[:, 0], values[:, 0]) and torch.all(one_id[:, 1:] == float("-inf"))
