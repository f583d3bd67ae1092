"""forward_step and loss_func for Megatron-LM's training loop, built on sft_token_loss.

Megatron calls forward_step(data_iterator, model) once per micro-batch; on the last pipeline
stage it then calls the returned loss_func(output_tensor), which gives (sum of the per-token
objective over loss tokens, number of loss tokens, report). With --calculate-per-token-loss
the loop adds both over micro-batches and data-parallel ranks and divides once, so the
objective is normalized by the global number of loss tokens of the step.
"""

from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import flatten_batch_for_packed_sequences, get_batch_on_this_tp_rank

from sed_megatron.loss import LossConfig, masked_sum_and_count, sft_token_loss

from .metrics import token_metric_report


@dataclass(frozen=True)
class StepConfig:
    loss: LossConfig
    micro_batch_size: int
    seq_length: int
    pipeline_model_parallel_size: int
    create_attention_mask: bool
    """The data loader gives a bool [1, s, s] causal mask (True = masked)."""
    with_entropy: bool
    """Report the entropy of the predicted distribution (costs one more pass in the loss)."""
    vocab_size: int | None = None
    """The model's real vocabulary; logits of the padding ids above it are left out of the loss."""
    packed_thd: bool = False
    """Rows are packed and carry cu_seqlens: Transformer Engine's packed-sequence (THD) attention."""


def get_batch(data_iterator, cfg: StepConfig):
    """This micro-batch on this rank: TP rank 0 reads it, then broadcasts to its TP group.

    Middle pipeline stages get nothing, or only the packed-sequence boundaries (THD)."""
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if not (first or last or cfg.packed_thd):
        return None
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    batch = next(data_iterator) if tp_rank == 0 else None
    return get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=cfg.packed_thd,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=cfg.create_attention_mask,
        broadcast_src_rank=parallel_state.get_tensor_model_parallel_src_rank(),
        broadcast_group=parallel_state.get_tensor_model_parallel_group(),
        cp_size=1,
        tp_rank=tp_rank,
        micro_batch_size=cfg.micro_batch_size,
        seq_length=cfg.seq_length,
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        is_pipeline_first_stage=first,
        is_pipeline_last_stage=last,
    )


def loss_func(cfg: StepConfig, labels, loss_mask, logits):
    """logits [b, s, V/tp] (consumed in place), labels [b, s] -> (loss sum, token count, report)."""
    loss_cfg = cfg.loss
    loss, stats = sft_token_loss(
        logits, labels, loss_cfg, parallel_state.get_tensor_model_parallel_group(),
        inplace=True, with_entropy=cfg.with_entropy, vocab_size=cfg.vocab_size,
    )
    loss_sum, num_tokens = masked_sum_and_count(loss, loss_mask)
    return loss_sum, num_tokens.to(torch.int), token_metric_report(loss, stats, loss_mask, loss_cfg.kind)


def thd_params(batch):
    """The micro-batch as one packed sequence: rows [b, s] -> [1, b*s] and PackedSeqParams."""
    batch = flatten_batch_for_packed_sequences(batch)
    cu_seqlens = batch["cu_seqlens"].reshape(-1)
    max_seqlen = int(batch["max_seqlen"].max())
    return batch, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                  max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def forward_step(cfg: StepConfig, data_iterator, model):
    """One micro-batch through the model; the loss follows in the returned loss_func."""
    batch = get_batch(data_iterator, cfg)
    packed = {}
    if cfg.packed_thd:
        batch, params = thd_params(batch)
        packed = {"packed_seq_params": params}
    if batch is None or batch["labels"] is None and batch["tokens"] is None:
        # a middle pipeline stage: activations come from the previous stage
        return model(None, None, None, **packed), partial(loss_func, cfg, None, None)
    # Without labels GPTModel returns the vocab-parallel logits [b, s, V/tp] on the last stage.
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), **packed)
    return output, partial(loss_func, cfg, batch["labels"], batch["loss_mask"])
