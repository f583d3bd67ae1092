"""Sequence packing without cross-sample attention: several samples in one row of seq_length.

A sample of n token ids fills n - 1 positions (inputs ids[:-1], targets ids[1:]). Samples are
placed greedily, in order, into rows; each row gets a block-diagonal causal attention mask
(bool [1, s, s], True = masked), position ids that restart at every sample, and targets that
never cross a sample boundary. With RoPE, attention scores depend only on the distance
between tokens, so a packed sample sees exactly what it would see alone; learned absolute
position embeddings read the restarted position ids.

With Transformer Engine (thd=True) the row carries cu_seqlens instead of the mask: the
boundaries of its samples (and of the padding tail, a segment of its own), int32, padded to
seq_length + 1 entries with copies of seq_length as Megatron-LM's packed SFT data does, plus
max_seqlen. Megatron then runs TE's packed-sequence (THD) attention, whose RoPE restarts at
every segment.

Under context parallelism (cp_size > 1, thd=True) every sample's segment is padded to a
multiple of 2 x CP, as Transformer Engine requires and as Megatron-LM's SFT data does: the
padding follows the sample's tokens inside its segment (no loss, position ids continuing),
so causal attention never lets a real token see it. cu_seqlens then hold the padded
boundaries, and cu_seqlens_padded (the same) is what Megatron's CP batch broadcast carries.
Each CP rank takes chunks r and 2 x CP - 1 - r of every segment (training/batch.py).

full_input=True (the published τ calibration, see data/simple.py): every sample takes one
more position, whose input is its last id (unless it fills seq_length already).
"""

import torch

from sed_megatron.loss import IGNORE_INDEX

from .simple import extend_past_end


def padded_positions(length, multiple=1):
    """Positions a sample of `length` tokens fills in a packed row: length - 1, rounded up."""
    return -(-(length - 1) // multiple) * multiple


def pack_greedy(lengths, seq_length, multiple=1):
    """Rows of sample indices, in order: a new row starts when the next sample does not fit
    (each sample taking its positions rounded up to `multiple`)."""
    rows, row, used = [], [], 0
    for index, length in enumerate(lengths):
        positions = padded_positions(length, multiple)
        if positions > seq_length:
            raise ValueError(f"sample {index} of {length} tokens exceeds seq_length + 1 = {seq_length + 1}")
        if row and used + positions > seq_length:
            rows.append(row)
            row, used = [], 0
        row.append(index)
        used += positions
    if row:
        rows.append(row)
    return rows


def packed_sample(samples, seq_length, pad_id=0, thd=False, cp_size=1):
    """One training row from [(ids, loss_mask), ...] whose positions sum to <= seq_length.

    cp_size > 1 (thd only): every sample's segment padded to a multiple of 2 x cp_size, and
    cu_seqlens_padded carried beside cu_seqlens."""
    if cp_size > 1 and not thd:
        raise ValueError("packing for context parallelism makes THD rows (thd=True)")
    multiple = 2 * cp_size if cp_size > 1 else 1
    tokens = torch.full((seq_length,), pad_id, dtype=torch.int64)
    labels = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.int64)
    loss_mask = torch.zeros(seq_length, dtype=torch.float32)
    position_ids = torch.zeros(seq_length, dtype=torch.int64)
    attention_mask = torch.ones(1, seq_length, seq_length, dtype=torch.bool)  # True = masked
    boundaries = [0]
    start = 0
    for ids, mask in samples:
        n = len(ids) - 1
        end = start + padded_positions(len(ids), multiple)  # padding (no loss) after the sample's n positions
        if end > seq_length:
            raise ValueError(f"samples of {end} positions do not fit seq_length {seq_length}")
        ids = torch.as_tensor(ids, dtype=torch.int64)
        tokens[start:start + n] = ids[:-1]
        labels[start:start + n] = ids[1:]
        loss_mask[start:start + n] = torch.as_tensor(mask[1:], dtype=torch.float32)
        position_ids[start:end] = torch.arange(end - start)
        attention_mask[0, start:end, start:end] = torch.triu(torch.ones(end - start, end - start, dtype=torch.bool),
                                                             diagonal=1)
        start = end
        boundaries.append(end)
    if start < seq_length:  # padding attends to itself only, so no row of the softmax is empty
        attention_mask[0, start:, start:] = ~torch.eye(seq_length - start, dtype=torch.bool)
        boundaries.append(seq_length)
    row = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    if not thd:
        return {**row, "attention_mask": attention_mask}
    cu_seqlens = torch.full((seq_length + 1,), seq_length, dtype=torch.int32)
    cu_seqlens[:len(boundaries)] = torch.tensor(boundaries, dtype=torch.int32)
    max_seqlen = max(b - a for a, b in zip(boundaries, boundaries[1:]))
    row = {**row, "cu_seqlens": cu_seqlens, "max_seqlen": torch.tensor(max_seqlen, dtype=torch.int32)}
    if cp_size > 1:
        if seq_length % multiple:
            raise ValueError(f"seq_length {seq_length} is not a multiple of 2 x CP = {multiple}")
        row["cu_seqlens_padded"] = cu_seqlens.clone()  # the boundaries already include the padding
    return row


class PackedSFTDataset:
    """Packed rows over an IndexedSFTDataset-like source, one packing per epoch of its order.

    source.epoch_documents(epoch) gives the documents of an epoch in order; rows are packed
    from them, and index i reads row i of the epoch that contains it. `first_samples(n)`: the
    rows that hold exactly the source's first n samples (what τ calibration scores).
    """

    def __init__(self, source, length, seq_length, thd=False, cp_size=1, full_input=False):
        self.source, self.length, self.seq_length, self.thd, self.cp_size = source, length, seq_length, thd, cp_size
        self.full_input = full_input
        self._epoch, self._rows, self._offset = 0, None, 0
        self._pack(0)

    def _pack(self, epoch):
        documents = self.source.epoch_documents(epoch)
        lengths = [int(self.source.tokens.sequence_lengths[d]) for d in documents]
        if self.full_input:  # one more id where it fits (extend_past_end)
            lengths = [n + 1 if n <= self.seq_length else n for n in lengths]
        self._epoch = epoch
        multiple = 2 * self.cp_size if self.cp_size > 1 else 1
        self._rows = [[documents[i] for i in row] for row in pack_greedy(lengths, self.seq_length, multiple)]

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        # Every epoch packs to about the same number of rows; walk epochs until index falls in one.
        if index < self._offset:
            self._offset = 0
            self._pack(0)
        while index >= self._offset + len(self._rows):
            self._offset += len(self._rows)
            self._pack(self._epoch + 1)
        row = self._rows[index - self._offset]
        samples = [(self.source.tokens[d].tolist(), self.source.masks[d].tolist()) for d in row]
        if not self.full_input:
            return packed_sample(samples, self.seq_length, thd=self.thd, cp_size=self.cp_size)
        extended = [extend_past_end(ids, mask, self.seq_length) for ids, mask in samples]
        return {**packed_sample([(ids, mask) for ids, mask, _ in extended], self.seq_length, thd=self.thd,
                                cp_size=self.cp_size),
                "unscored_past_end": torch.tensor(sum(not fits for _, _, fits in extended))}

    def with_full_input(self):
        """These rows' samples with every id an input, packed anew: the published τ calibration's view."""
        return PackedSFTDataset(self.source, self.length, self.seq_length, self.thd, self.cp_size, full_input=True)

    def first_samples(self, num_samples):
        """A packed dataset of exactly the first num_samples samples of epoch 0 (the ones an
        unpacked source reads at indices 0 .. num_samples - 1, when the split holds that many);
        its length is its number of rows."""
        first = _FirstDocuments(self.source, num_samples)
        packed = PackedSFTDataset(first, 1, self.seq_length, thd=self.thd, cp_size=self.cp_size,
                                  full_input=self.full_input)
        packed.length = len(packed._rows)
        return packed


class _FirstDocuments:
    """The first n documents of a source's epoch-0 order, as every epoch."""

    def __init__(self, source, n):
        self.tokens, self.masks = source.tokens, source.masks
        order = source.epoch_documents(0)
        self._documents = (order * -(-n // len(order)))[:n]  # a split smaller than n repeats, as unpacked reads do

    def epoch_documents(self, epoch):
        return self._documents
