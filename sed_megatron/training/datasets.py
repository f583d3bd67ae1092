"""The datasets of a run: (train, valid, test) from its DataConfig (Megatron's datasets_provider).

    train, valid, test = build_datasets(run.data, [n_train, n_valid, n_test])
"""

def packs_thd(args):
    """Packed rows go through packed-sequence (THD) attention: Transformer Engine's, or under
    context parallelism the local CP attention's (which reads the boundaries like TE). Packed
    rows on the local layers at CP=1 carry a block-diagonal attention mask instead."""
    return args.sft_pack and (args.transformer_impl == "transformer_engine" or args.context_parallel_size > 1)


def build_datasets(data, train_val_test_num_samples):
    """(train, valid, test) datasets of already tokenized samples; data: a run_config.DataConfig."""
    from sed_megatron.data.packing import PackedSFTDataset
    from sed_megatron.data.sft_preprocess import IndexedSFTDataset, read_indexed_sft, split_indices
    from sed_megatron.data.simple import JsonlSFTDataset, SyntheticSFTDataset

    if data.kind == "indexed":
        splits = split_indices(len(read_indexed_sft(data.path)[0]), data.valid_fraction, data.seed)
    datasets = []
    for split, num_samples in enumerate(train_val_test_num_samples):
        length = max(int(num_samples or 0), 1)
        if data.kind == "indexed":
            indices = splits[min(split, 1)] or splits[0]  # test = valid; no valid split: train samples
            dataset = IndexedSFTDataset(data.path, indices, length, data.seq_length, data.seed + split)
            if data.pack:  # carries its own mask (local, CP=1) or cu_seqlens (THD)
                datasets.append(PackedSFTDataset(dataset, length, data.seq_length, thd=data.packs_thd,
                                                 cp_size=data.cp_size))
                continue
        elif data.kind == "synthetic":
            dataset = SyntheticSFTDataset(length, data.seq_length, data.vocab_size, data.num_samples,
                                          data.prompt_length, data.seed + split)
        else:
            dataset = JsonlSFTDataset(data.path, length, data.seq_length, data.vocab_size)
        datasets.append(_with_attention_mask(dataset, data.seq_length) if data.attention_mask else dataset)
    return tuple(datasets)


class _with_attention_mask:
    """Adds the bool [1, s, s] causal mask (True = masked) that the local attention expects."""

    def __init__(self, dataset, seq_length):
        import torch

        self.dataset = dataset
        self.mask = torch.triu(torch.ones(1, seq_length, seq_length, dtype=torch.bool), diagonal=1)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], "attention_mask": self.mask}

    def with_full_input(self):
        """The wrapped dataset's published-calibration view (every id an input), with the mask."""
        import copy

        view = copy.copy(self)
        view.dataset = self.dataset.with_full_input()
        return view
