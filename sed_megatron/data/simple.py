"""Already tokenized SFT samples for the training loop: a seeded synthetic set and a JSONL reader.

Every sample is a dict of `[s]` tensors, as Megatron's GPT batches are:
tokens (int64 input ids), labels (int64 next-token ids, IGNORE_INDEX on padding), loss_mask
(fp32, 1 where the next token is a target: the response), position_ids (int64). Prompt
positions keep their labels so that statistics over every token (τ calibration with all
tokens) can be taken; the loss mask keeps them out of the loss.

A dataset's `with_full_input()` is its view for the published τ calibration, where every id
is an input (see `sample_from_tokens`).
"""

import copy

import torch

from sed_megatron.data.jsonl import read_jsonl
from sed_megatron.loss import IGNORE_INDEX


def extend_past_end(tokens, loss_mask, seq_length, pad_id=0):
    """(tokens, loss_mask, fits): the sample with pad_id appended (no loss), so that its last id
    becomes an input too, whose target lies past the end; unchanged and fits=False when the
    sample's seq_length + 1 ids already fill every position."""
    if len(tokens) > seq_length:
        return tokens, loss_mask, False
    return list(tokens) + [pad_id], list(loss_mask) + [0], True


def sample_from_tokens(tokens, loss_mask, seq_length, pad_id=0, full_input=False):
    """A training sample from `seq_length + 1` or fewer token ids and a per-token loss mask.

    loss_mask[i] says whether token i is a target (so position i - 1 predicts it with loss).
    Shorter samples are padded (padding carries no loss); longer ones are an error.

    full_input (the published τ calibration): every id is an input, the last one included, at
    one more position whose target (pad_id, no loss) lies past the end; "unscored_past_end"
    (0-dim int64) is 1 when the sample fills seq_length, so that position had no room and the
    sample keeps its seq_length positions.
    """
    if len(tokens) != len(loss_mask):
        raise ValueError(f"tokens ({len(tokens)}) and loss_mask ({len(loss_mask)}) differ in length")
    if len(tokens) > seq_length + 1:
        raise ValueError(f"sample of {len(tokens)} tokens exceeds seq_length + 1 = {seq_length + 1}")
    extra = {}
    if full_input:
        tokens, loss_mask, fits = extend_past_end(tokens, loss_mask, seq_length, pad_id)
        extra = {"unscored_past_end": torch.tensor(int(not fits))}
    pad = seq_length + 1 - len(tokens)
    ids = torch.tensor(list(tokens) + [pad_id] * pad, dtype=torch.int64)
    is_target = torch.tensor([bool(m) for m in loss_mask] + [False] * pad)
    labels = ids[1:].clone()
    labels[len(tokens) - 1 :] = IGNORE_INDEX  # padding predicts nothing
    return {
        "tokens": ids[:-1],
        "labels": labels,
        "loss_mask": is_target[1:].float(),
        "position_ids": torch.arange(seq_length, dtype=torch.int64),
        **extra,
    }


def full_input_view(dataset):
    """A copy of `dataset` (a class here, or IndexedSFTDataset) whose samples have every id as an
    input (`sample_from_tokens(..., full_input=True)`): what the published τ calibration scores."""
    view = copy.copy(dataset)
    view.full_input = True
    return view


class SyntheticSFTDataset(torch.utils.data.Dataset):
    """A seeded memorization set: a prompt, then a response that follows from it.

    Sample j (of num_samples distinct ones, repeated to fill `length`): prompt_length random
    tokens, then the response t_i = (t_{i-1} + t_{i-2}) mod vocab_size, whose tokens carry the
    loss. A small model learns it in a few dozen steps, so the loss falls visibly.
    """

    def __init__(self, length, seq_length, vocab_size, num_samples, prompt_length, seed):
        if not 2 <= prompt_length < seq_length:
            raise ValueError(f"prompt_length must lie in [2, seq_length), got {prompt_length}")
        self.length, self.seq_length, self.full_input = length, seq_length, False
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab_size, (num_samples, seq_length + 1), generator=gen)
        for i in range(prompt_length, seq_length + 1):
            tokens[:, i] = (tokens[:, i - 1] + tokens[:, i - 2]) % vocab_size
        self.samples = tokens.tolist()
        self.loss_mask = [0] * prompt_length + [1] * (seq_length + 1 - prompt_length)

    def with_full_input(self):
        return full_input_view(self)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return sample_from_tokens(self.samples[index % len(self.samples)], self.loss_mask, self.seq_length,
                                  full_input=self.full_input)


class JsonlSFTDataset(torch.utils.data.Dataset):
    """Pre-tokenized samples, one JSON object per line: {"tokens": [...], "loss_mask": [...]}."""

    def __init__(self, path, length, seq_length, vocab_size):
        self.length, self.seq_length, self.vocab_size, self.full_input = length, seq_length, vocab_size, False
        self.samples = read_jsonl(path, self._parse)

    def _parse(self, record):
        tokens, loss_mask = record["tokens"], record["loss_mask"]
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in tokens):
            raise ValueError(f"token ids must be integers in [0, {self.vocab_size})")
        sample_from_tokens(tokens, loss_mask, self.seq_length)  # validates lengths
        return tokens, loss_mask

    def with_full_input(self):
        return full_input_view(self)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        tokens, loss_mask = self.samples[index % len(self.samples)]
        return sample_from_tokens(tokens, loss_mask, self.seq_length, full_input=self.full_input)
