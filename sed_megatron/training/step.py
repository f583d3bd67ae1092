"""forward_step and loss_func for Megatron-LM's training loop, built on sft_token_loss.

Megatron calls forward_step(data_iterator, model) once per micro-batch; on the last pipeline
stage it then calls the returned loss_func(output_tensor), which gives (sum of the per-token
objective over loss tokens, number of loss tokens, report). With --calculate-per-token-loss
the loop adds both over micro-batches and over the data- x context-parallel group (DDP sums
the gradients over it, finalize_model_grads all-reduces the token count there and divides
once), so the objective is normalized by the global number of loss tokens of the step. Under
context parallelism each rank's sums cover its own chunks of every sequence: nothing is
scaled by CP.

The process groups are the ones the model was built with (`model.pg_collection`, which
Megatron's get_model hands to the model provider): nothing here reads parallel_state.
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from megatron.core.utils import get_attr_wrapped_model

from sed_megatron.loss import LossConfig, masked_sum_and_count, sft_token_loss

from .batch import BatchSpec, get_batch
from .metrics import token_metric_report
from .nonfinite import check_loss


@dataclass(frozen=True)
class StepConfig:
    loss: LossConfig
    batch: BatchSpec
    with_entropy: bool = False
    """Report the entropy of the predicted distribution (costs one more pass in the loss)."""
    vocab_size: int | None = None
    """The model's real vocabulary; logits of the padding ids above it are left out of the loss."""
    check_non_finite: bool = True
    """Reject a NaN or Inf loss before the backward pass (Megatron's --check-for-nan-in-loss-and-grad)."""
    inject: Callable | None = None
    """Testing: loss sum -> loss sum, made non-finite at one iteration (nonfinite.Injection)."""


def model_groups(model):
    """The ProcessGroupCollection (tp, pp, dp, cp, ...) the model chunk was built with."""
    return get_attr_wrapped_model(model, "pg_collection")


def model_forward(model, batch):
    """One model chunk on its share of the micro-batch (batch None: a middle pipeline stage)."""
    packed_seq_params = batch["packed_seq_params"] if batch is not None else None
    if batch is None or (batch["tokens"] is None and batch["labels"] is None):
        return model(None, None, None, packed_seq_params=packed_seq_params)  # activations from the previous stage
    # Without labels GPTModel returns the vocab-parallel logits [b, s, V/tp] on the last stage.
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                 packed_seq_params=packed_seq_params)


def loss_func(cfg: StepConfig, tp_group, labels, loss_mask, logits):
    """logits [b, s, V/tp] (consumed in place), labels [b, s] -> (loss sum, token count, report)."""
    loss, stats = sft_token_loss(logits, labels, cfg.loss, tp_group, inplace=True, with_entropy=cfg.with_entropy,
                                 vocab_size=cfg.vocab_size)
    loss_sum, num_tokens = masked_sum_and_count(loss, loss_mask)
    if cfg.inject is not None:
        loss_sum = cfg.inject(loss_sum)
    if cfg.check_non_finite:
        check_loss(loss_sum)
    return loss_sum, num_tokens.to(torch.int), token_metric_report(loss, stats, loss_mask)


def forward_step(cfg: StepConfig, data_iterator, model):
    """One micro-batch through the model; the loss follows in the returned loss_func."""
    groups = model_groups(model)
    batch = get_batch(data_iterator, cfg.batch, groups)
    output = model_forward(model, batch)
    labels, loss_mask = (batch["labels"], batch["loss_mask"]) if batch is not None else (None, None)
    return output, partial(loss_func, cfg, groups.tp, labels, loss_mask)
