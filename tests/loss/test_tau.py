"""The τ quantile rule and the exact gather across ranks."""

import pytest
import torch

from sed_megatron.loss import IGNORE_INDEX
from sed_megatron.loss.tau import gather_values, select_tokens, tau_from_topk_mass

from ..distributed import run_distributed


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


class _Documents(list):
    """Documents as an IndexedDataset reads them: [d] and sequence_lengths."""

    def __init__(self, documents):
        super().__init__(torch.tensor(d) for d in documents)
        self.sequence_lengths = [len(d) for d in documents]


class _Source:
    """An IndexedSFTDataset-like source of hand-made samples, for PackedSFTDataset."""

    def __init__(self, samples):
        self.tokens, self.masks = _Documents([ids for ids, _ in samples]), _Documents([mask for _, mask in samples])

    def epoch_documents(self, epoch):
        return list(range(len(self.tokens)))


def test_published_tokens_are_every_id_of_the_sample():
    """Published: every position of the full ids, prompt included and the last id (whose
    prediction lies past the end), by hand on ids 5 6 | 7 8 (prompt | response)."""
    from sed_megatron.data.simple import sample_from_tokens

    ids, mask, seq = [5, 6, 7, 8], [0, 0, 1, 1], 6
    mass = torch.arange(1, seq + 1, dtype=torch.float32)[None] / 10  # position i holds (i + 1) / 10

    row = {key: value[None] for key, value in sample_from_tokens(ids, mask, seq).items()}
    assert select_tokens(mass, row["labels"], row["loss_mask"], "response").tolist() == pytest.approx([0.2, 0.3])
    assert select_tokens(mass, row["labels"], row["loss_mask"], "all").tolist() == pytest.approx([0.1, 0.2, 0.3])

    full = sample_from_tokens(ids, mask, seq, full_input=True)
    assert full["tokens"].tolist() == [5, 6, 7, 8, 0, 0]  # every id an input, then padding
    assert full["labels"].tolist() == [6, 7, 8, 0, IGNORE_INDEX, IGNORE_INDEX]  # past the end: a target, no loss
    assert full["loss_mask"].tolist() == [0, 1, 1, 0, 0, 0] and int(full["unscored_past_end"]) == 0
    full = {key: value[None] for key, value in full.items()}
    # 4 ids, 4 positions: the prompt's two and the last id's
    assert select_tokens(mass, full["labels"], full["loss_mask"], "published").tolist() == pytest.approx(
        [0.1, 0.2, 0.3, 0.4])

    # A sample that fills seq_length has no room for the position past its end: scored without it.
    filled = sample_from_tokens(list(range(1, seq + 2)), [0, 0] + [1] * (seq - 1), seq, full_input=True)
    assert filled["tokens"].tolist() == list(range(1, seq + 1)) and int(filled["unscored_past_end"]) == 1
    assert int((filled["labels"] != IGNORE_INDEX).sum()) == seq


@pytest.mark.parametrize("thd, cp", [(False, 1), (True, 1), (True, 2)])
def test_published_tokens_of_packed_rows(thd, cp):
    """Packed rows of full inputs: each sample takes one more position, attention stays within it."""
    from sed_megatron.data.packing import PackedSFTDataset

    samples = [([5, 6, 7], [0, 1, 1]), ([9, 10, 11, 12], [0, 0, 1, 1])]
    seq = 8
    packed = PackedSFTDataset(_Source(samples), 1, seq, thd=thd, cp_size=cp)
    rows = packed.with_full_input().first_samples(2)
    assert rows.length == 1
    row = rows[0]
    if cp == 1:  # 3 + 4 positions and a padding tail
        assert row["tokens"].tolist() == [5, 6, 7, 9, 10, 11, 12, 0]
        assert row["labels"].tolist() == [6, 7, 0, 10, 11, 12, 0, IGNORE_INDEX]
        starts = [0, 3]
    else:  # every sample padded to a multiple of 2 x CP = 4 positions
        assert row["tokens"].tolist() == [5, 6, 7, 0, 9, 10, 11, 12]
        assert row["labels"].tolist() == [6, 7, 0, IGNORE_INDEX, 10, 11, 12, 0]
        starts = [0, 4]
    mass = torch.arange(1, seq + 1, dtype=torch.float32)[None] / 10
    chosen = select_tokens(mass, row["labels"][None], row["loss_mask"][None], "published")
    expected = [(start + i + 1) / 10 for start, (ids, _) in zip(starts, samples) for i in range(len(ids))]
    assert chosen.tolist() == pytest.approx(expected) and int(row["unscored_past_end"]) == 0
    if thd:
        assert row["cu_seqlens"][:3].tolist() == ([0, 3, 7] if cp == 1 else [0, 4, 8])
    else:
        attention = row["attention_mask"][0]  # True = masked
        assert not attention[3, 3] and attention[3, 2] and not attention[2, 0]  # 2nd sample blind to the 1st


def test_calibration_k():
    """k = 10 for the published token set (the published code's calibration k), else training's k."""
    import argparse

    from sed_megatron.cli.calibrate_tau import calibration_settings
    from sed_megatron.loss.tau import PUBLISHED_TOP_K, calibration_top_k
    from sed_megatron.training.arguments import calibration_top_k_from_args

    assert PUBLISHED_TOP_K == 10
    assert calibration_top_k("published", 2) == 10 and calibration_top_k("published", 2, 3) == 3
    assert calibration_top_k("response", 2) == 2 and calibration_top_k("all", 5) == 5
    run = argparse.Namespace(sed_top_k=2, sed_calibrate_samples=100, sed_calibrate_tokens="published",
                             sed_calibrate_top_k=None)
    assert calibration_top_k_from_args(run) == 10
    assert calibration_top_k_from_args(argparse.Namespace(**{**vars(run), "sed_calibrate_tokens": "response"})) == 2
    # The tool's options default to the run's loss.calibrate_* settings; its own win.
    tool = argparse.Namespace(**vars(run), calibration_samples=None, calibration_tokens=None, calibration_top_k=None)
    assert calibration_settings(tool) == (100, "published", 10)
    tool.calibration_tokens, tool.calibration_samples = "all", 7
    assert calibration_settings(tool) == (7, "all", 2)
    tool.calibration_top_k = 4
    assert calibration_settings(tool) == (7, "all", 4)
