"""Tokenized-sample datasets: sample layout, the synthetic set, JSONL errors naming file and line."""

import json

import pytest
import torch

from sed_megatron.data.simple import JsonlSFTDataset, SyntheticSFTDataset, sample_from_tokens
from sed_megatron.loss import IGNORE_INDEX


def test_sample_shifts_targets_and_masks_prompt_and_padding():
    sample = sample_from_tokens([5, 6, 7, 8], [0, 0, 1, 1], seq_length=5)
    assert sample["tokens"].tolist() == [5, 6, 7, 8, 0]
    assert sample["labels"].tolist() == [6, 7, 8, IGNORE_INDEX, IGNORE_INDEX]
    assert sample["loss_mask"].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert sample["position_ids"].tolist() == [0, 1, 2, 3, 4]
    assert sample["tokens"].dtype == sample["labels"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32


def test_synthetic_response_follows_from_prompt():
    data = SyntheticSFTDataset(length=10, seq_length=12, vocab_size=50, num_samples=3, prompt_length=4, seed=0)
    sample = data[4]  # repeats sample 1
    assert torch.equal(sample["tokens"], data[1]["tokens"])
    full = sample["tokens"].tolist()
    for i in range(4, 12):
        assert full[i] == (full[i - 1] + full[i - 2]) % 50
    assert sample["loss_mask"].tolist() == [0.0] * 3 + [1.0] * 9


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", ":2: "),
        (json.dumps({"tokens": [1, 2]}), ":2: missing field 'loss_mask'"),
        (json.dumps({"tokens": [1, 99], "loss_mask": [0, 1]}), ":2: token ids must be integers in [0, 50)"),
        (json.dumps({"tokens": [1] * 20, "loss_mask": [1] * 20}), ":2: sample of 20 tokens exceeds"),
        (json.dumps({"tokens": [1, 2], "loss_mask": [1]}), ":2: tokens (2) and loss_mask (1) differ"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"tokens": [1, 2, 3], "loss_mask": [0, 1, 1]}) + "\n" + line + "\n")
    with pytest.raises(ValueError) as err:
        JsonlSFTDataset(str(path), length=4, seq_length=8, vocab_size=50)
    assert str(err.value).startswith(str(path)) and message in str(err.value)
