"""An indexed SFT dataset checked before the first step: its files agree with their indexes.

    problem = indexed_sft_problem(prefix)   # None, or one line naming the files

tools/preprocess_sft_data.py writes PREFIX.bin / .idx (token ids) and PREFIX_loss_mask.bin /
.idx (one mask value per token). A copy cut short, or token and mask files of two different
runs, would be found only when a sample is read (a numpy error, mid-run) or never (a mask
shifted against its tokens trains on the wrong tokens). The check reads the indexes and stats
the .bin files: the .bin holds every sequence the .idx points to, and the mask has as many
sequences as the tokens, each as long.
"""

import os


def _index(idx_path):
    """Megatron's reader of one .idx; ValueError (one line) when it does not read."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    try:
        return _IndexReader(idx_path, multimodal=False)
    except Exception as err:  # noqa: BLE001 - a cut or foreign file fails in numpy or struct
        raise ValueError(f"{idx_path}: unreadable index ({type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0]})") from None


def _bin_problem(prefix, index):
    bin_path = prefix + ".bin"
    needed = 0
    if index.sequence_count:
        needed = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    size = os.stat(bin_path).st_size
    if size < needed:
        return f"{bin_path}: truncated: {size} of {needed} bytes (its {os.path.basename(prefix)}.idx says)"
    return None


def indexed_sft_problem(prefix):
    """None when the indexed SFT dataset at prefix is whole, else one line naming the files."""
    import numpy

    mask_prefix = prefix + "_loss_mask"
    for path in (prefix + ".idx", prefix + ".bin", mask_prefix + ".idx", mask_prefix + ".bin"):
        if not os.path.exists(path):
            return f"{path}: missing (write the dataset with tools/preprocess_sft_data.py)"
    try:
        tokens, masks = _index(prefix + ".idx"), _index(mask_prefix + ".idx")
    except ValueError as err:
        return str(err)
    for file_prefix, index in ((prefix, tokens), (mask_prefix, masks)):
        problem = _bin_problem(file_prefix, index)
        if problem:
            return problem
    if tokens.sequence_count != masks.sequence_count:
        return (f"{mask_prefix}.idx: {masks.sequence_count} loss-mask sequences but {prefix}.idx has "
                f"{tokens.sequence_count} token sequences (files of two different datasets?)")
    differ = numpy.flatnonzero(tokens.sequence_lengths != masks.sequence_lengths)
    if len(differ):
        first = int(differ[0])
        return (f"{mask_prefix}.idx: sample {first} has {int(masks.sequence_lengths[first])} loss-mask values but "
                f"{int(tokens.sequence_lengths[first])} tokens in {prefix}.idx ({len(differ)} samples differ: files "
                f"of two different datasets?)")
    return None
