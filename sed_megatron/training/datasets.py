"""The datasets of a run: (train, valid, test) from its data settings (Megatron's datasets_provider).

    train, valid, test = build_datasets(args, [n_train, n_valid, n_test])
"""

def packs_thd(args):
    """Packed rows go through packed-sequence (THD) attention: Transformer Engine's, or under
    context parallelism the local CP attention's (which reads the boundaries like TE). Packed
    rows on the local layers at CP=1 carry a block-diagonal attention mask instead."""
    return args.sft_pack and (args.transformer_impl == "transformer_engine" or args.context_parallel_size > 1)


def build_datasets(args, train_val_test_num_samples):
    """(train, valid, test) datasets of already tokenized samples."""
    from sed_megatron.data.packing import PackedSFTDataset
    from sed_megatron.data.sft_preprocess import IndexedSFTDataset, read_indexed_sft, split_indices
    from sed_megatron.data.simple import JsonlSFTDataset, SyntheticSFTDataset

    if args.sft_data_kind == "indexed":
        splits = split_indices(len(read_indexed_sft(args.sft_data_path)[0]), args.sft_valid_fraction,
                               args.sft_data_seed)
    datasets = []
    for split, num_samples in enumerate(train_val_test_num_samples):
        length = max(int(num_samples or 0), 1)
        if args.sft_data_kind == "indexed":
            indices = splits[min(split, 1)] or splits[0]  # test = valid; no valid split: train samples
            dataset = IndexedSFTDataset(args.sft_data_path, indices, length, args.seq_length,
                                        args.sft_data_seed + split)
            if args.sft_pack:  # carries its own mask (local, CP=1) or cu_seqlens (THD)
                datasets.append(PackedSFTDataset(dataset, length, args.seq_length, thd=packs_thd(args),
                                                 cp_size=args.context_parallel_size))
                continue
        elif args.sft_data_kind == "synthetic":
            dataset = SyntheticSFTDataset(length, args.seq_length, args.vocab_size, args.sft_num_samples,
                                          args.sft_prompt_length, args.sft_data_seed + split)
        else:
            dataset = JsonlSFTDataset(args.sft_data_path, length, args.seq_length, args.vocab_size)
        datasets.append(_with_attention_mask(dataset, args.seq_length) if args.create_attention_mask_in_dataloader
                        else dataset)
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
