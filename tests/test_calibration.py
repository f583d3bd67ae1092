"""The τ quantile rule and the exact gather across ranks."""

import pytest
import torch

from sed_megatron.calibration import gather_values, select_tokens, tau_from_topk_mass
from sed_megatron.loss import IGNORE_INDEX
from sed_megatron.testing.distributed import run_distributed


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.3, 0.5, 0.7, 0.999, 1.0])
@pytest.mark.parametrize("n", [1, 7, 100, 1001])
def test_matches_the_published_rule(ratio, n):
    values = torch.rand(n, generator=torch.Generator().manual_seed(n))
    tau = tau_from_topk_mass(values, ratio)
    k = int(ratio * n)
    assert tau == float(sorted(values.double().tolist())[-k])  # published: sorted(values)[-int(r * N)]
    if k == 0:  # [-0] is the smallest value: no token lies below it, none gets the penalty
        assert tau == float(values.double().min()) and int((values.double() < tau).sum()) == 0
    else:  # (1 - r) of the tokens (up to one) fall under tau and get the penalty
        assert int((values.double() < tau).sum()) == n - k


def test_errors():
    with pytest.raises(ValueError, match="mask ratio"):
        tau_from_topk_mass(torch.rand(4), 1.5)
    with pytest.raises(ValueError, match="no tokens"):
        tau_from_topk_mass(torch.empty(0), 0.7)


def test_select_tokens():
    mass = torch.tensor([[0.1, 0.2, 0.3]])
    labels = torch.tensor([[4, 5, IGNORE_INDEX]])
    loss_mask = torch.tensor([[0.0, 1.0, 0.0]])
    assert select_tokens(mass, labels, loss_mask, "response").tolist() == pytest.approx([0.2])
    assert select_tokens(mass, labels, loss_mask, "all").tolist() == pytest.approx([0.1, 0.2])


def check_gather():
    import torch.distributed as dist

    rank = dist.get_rank()
    values = torch.arange(3 + 2 * rank, dtype=torch.float32) + 100 * rank  # 3 and 5 values
    everything = gather_values(values, dist.group.WORLD)
    assert everything.tolist() == [0, 1, 2] + [100, 101, 102, 103, 104]
    whole = torch.cat([torch.arange(3.0), torch.arange(5.0) + 100])
    assert tau_from_topk_mass(everything, 0.7) == tau_from_topk_mass(whole, 0.7)


def test_gather_is_exact_with_uneven_ranks():
    run_distributed(check_gather, world_size=2)
