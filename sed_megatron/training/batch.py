"""The one batch pipeline: how a micro-batch of training data reaches the model on every rank.

Training, τ calibration and every other forward pass over training data take their batches
from `get_batch`, in four steps:
  1. read: tensor-parallel rank 0 draws the micro-batch from the data iterator and moves it to
     the compute device;
  2. broadcast: the rest of its tensor-parallel group receive it (Megatron's
     `get_batch_on_this_tp_rank`); middle pipeline stages need no data, or only the packed
     sequence boundaries;
  3. THD: packed rows with sample boundaries (`cu_seqlens`) are flattened into one sequence
     (Megatron's `flatten_batch_for_packed_sequences`), so attention keeps samples apart;
  4. context-parallel slice: each CP rank keeps its share of the sequence (a no-op at CP=1):
     chunks r and 2 x CP - 1 - r of every row (unpacked) or of every packed sample (THD).
     RoPE follows: GPTModel takes the same chunks of its position table for unpacked rows, and
     restarts positions per sample (CP-aware) for THD rows.

Process groups come from the caller (a Megatron `ProcessGroupCollection`: `.tp`, `.pp`, `.cp`).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import (
    flatten_batch_for_packed_sequences,
    get_batch_on_this_cp_rank,
    get_batch_on_this_tp_rank,
)

from sed_megatron.models.layers.context_parallel import check_cp_segments, cp_partition_indices
from sed_megatron.parallel import pipeline_stage

_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask", "cu_seqlens", "cu_seqlens_padded",
         "max_seqlen")
_SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass(frozen=True)
class BatchSpec:
    """What every rank must know of a micro-batch before it arrives."""

    micro_batch_size: int
    seq_length: int
    create_attention_mask: bool
    """The data loader gives a bool [b, 1, s, s] attention mask (True = masked): the local layers."""
    packed_thd: bool = False
    """Rows are packed and carry cu_seqlens: packed-sequence (THD) attention (Transformer Engine's,
    or the local CP attention's); at CP > 1 every sample is padded to a multiple of 2 x CP."""


def _to_device(batch):
    """The data loader's tensors on the compute device (the CPU layer maps .cuda() to the CPU)."""
    return {key: (value.cuda(non_blocking=True) if isinstance(value, torch.Tensor) else value)
            for key, value in batch.items()}


def broadcast_in_tensor_parallel_group(data_iterator, spec: BatchSpec, groups):
    """Steps 1 and 2: the micro-batch on every rank of the TP group (None on a middle stage without THD)."""
    first, last = pipeline_stage(groups.pp)
    if not (first or last or spec.packed_thd):
        return None
    tp_rank = dist.get_rank(group=groups.tp)
    batch = _to_device({key: value for key, value in next(data_iterator).items() if key in _KEYS}) if tp_rank == 0 else None
    return get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=spec.packed_thd,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=spec.create_attention_mask,
        broadcast_src_rank=dist.get_global_rank(groups.tp, 0),
        broadcast_group=groups.tp,
        cp_size=dist.get_world_size(group=groups.cp),
        tp_rank=tp_rank,
        micro_batch_size=spec.micro_batch_size,
        seq_length=spec.seq_length,
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=dist.get_world_size(group=groups.pp),
        is_pipeline_first_stage=first,
        is_pipeline_last_stage=last,
    )


def slice_for_context_parallel(batch, cp_group):
    """Step 4: this CP rank's share of the sequence dimension; the batch itself at CP=1.

    Unpacked rows: Megatron's `get_batch_on_this_cp_rank` (per-sequence balancing: chunks r and
    2 x CP - 1 - r of every row; an attention mask keeps all its keys, [b, 1, s/cp, s]).
    Packed THD rows (flattened, cu_seqlens [1, n]): per-document balancing, the same two chunks
    of every sample, in the order of TE's `thd_get_partitioned_indices` (which Megatron's
    version calls; here in torch, so it also runs without TE and on middle pipeline stages,
    which hold the boundaries but no tokens or labels)."""
    cp_size = dist.get_world_size(group=cp_group)
    if cp_size == 1:
        return batch
    if batch.get("cu_seqlens") is None:
        return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False, cp_group=cp_group)
    cu_seqlens = batch.get("cu_seqlens_padded")
    cu_seqlens = (batch["cu_seqlens"] if cu_seqlens is None else cu_seqlens).reshape(-1)
    check_cp_segments(cu_seqlens, cp_size)
    index = cp_partition_indices(cu_seqlens, int(cu_seqlens[-1]), cp_size, dist.get_rank(group=cp_group))
    return {key: (value.index_select(1, index) if key in _SEQUENCE_KEYS and value is not None else value)
            for key, value in batch.items()}


def packed_seq_params(batch):
    """PackedSeqParams (format thd) of a flattened batch; the boundaries include the CP padding."""
    cu_seqlens = batch["cu_seqlens"].reshape(-1)
    padded = batch.get("cu_seqlens_padded")
    padded = padded.reshape(-1) if padded is not None else None
    max_seqlen = int(batch["max_seqlen"].max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def get_batch(data_iterator, spec: BatchSpec, groups):
    """The micro-batch as this rank's model chunk needs it, or None on a middle pipeline stage.

    Keys: tokens, position_ids, attention_mask (or None), labels, loss_mask, each [b, s/cp]
    (None where this stage does not use it), and packed_seq_params (None unless spec.packed_thd)."""
    batch = broadcast_in_tensor_parallel_group(data_iterator, spec, groups)
    if batch is None:
        return None
    if spec.packed_thd:
        batch = flatten_batch_for_packed_sequences(dict(batch))
    batch = slice_for_context_parallel(batch, groups.cp)
    return {**batch, "packed_seq_params": packed_seq_params(batch) if spec.packed_thd else None}
