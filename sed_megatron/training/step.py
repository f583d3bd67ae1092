"""forward_step and loss_func for Megatron-LM's training loop, built on sft_token_loss.

With `fused_linear` the last stage's output layer and the loss run together
(fused_linear_sft_loss through GPTModel's output_processor hook): the model returns the loss
sum and the stats instead of the `[b, s, V/tp]` logits, which never exist.

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

from sed_megatron.loss import LossConfig, fused_linear_sft_loss, masked_sum_and_count, sft_token_loss
from sed_megatron.parallel import model_groups

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
    fused_linear: bool = False
    """The output layer and the loss chunk by chunk of tokens (fused_linear_sft_loss)."""
    fused_chunk_tokens: int | None = None
    """Tokens per chunk of the fused loss (None: its default element budget)."""
    fused_grad_in_forward: bool | None = None
    """The fused loss's gradient scheme (None: the device's default, fused_linear.default_grad_in_forward)."""


def loss_scale(config, device):
    """What Megatron's schedule multiplies the loss by before its backward: the optimizer's loss
    scale (`config.grad_scale_func`, a 0-dim tensor), 1.0 without one (evaluation, calibration)."""
    if config.grad_scale_func is None:
        return 1.0
    return config.grad_scale_func(torch.ones((), device=device)).reshape(())


def fused_output(cfg: StepConfig, hidden_states, output_layer, output_weight, context, config, **unused):
    """GPTModel's output_processor: the output layer and the loss of this stage's tokens.

    hidden_states `[s, b, h]` (this rank's `[s/tp, b, h]` under SP); the weight is the output
    layer's, or the embedding's when they are tied. Returns (loss sum, stats `[b, s]`).

    The weight gradient goes into Megatron's main_grad whenever the weight has one (its DDP
    buffers), with or without apex and whatever --no-gradient-accumulation-fusion says: the fused
    loss has its own fp32-accumulating GEMM, and a 16-bit gradient for DDP to add would be a
    rounding and a weight-sized tensor more."""
    labels, loss_mask = context
    weight = output_layer.weight if output_weight is None else output_weight
    loss_sum, stats = fused_linear_sft_loss(
        hidden_states, weight, labels.t(), loss_mask.t(), cfg.loss, output_layer.tp_group,
        chunk_size=cfg.fused_chunk_tokens, sequence_parallel=output_layer.sequence_parallel,
        vocab_size=cfg.vocab_size, with_entropy=cfg.with_entropy,
        gradient_accumulation_fusion=hasattr(weight, "main_grad"), grad_in_forward=cfg.fused_grad_in_forward,
        output_grad_scale=loss_scale(config, hidden_states.device))
    return loss_sum, {name: value.t() for name, value in stats.items()}


def model_forward(model, batch, cfg: StepConfig | None = None):
    """One model chunk on its share of the micro-batch (batch None: a middle pipeline stage).

    The last stage returns the logits, or with cfg.fused_linear the loss sum and the stats."""
    packed_seq_params = batch["packed_seq_params"] if batch is not None else None
    if batch is None or (batch["tokens"] is None and batch["labels"] is None):
        return model(None, None, None, packed_seq_params=packed_seq_params)  # activations from the previous stage
    extra = {}
    if cfg is not None and cfg.fused_linear and batch["labels"] is not None:  # the last stage
        extra = {"output_processor": partial(fused_output, cfg),
                 "output_processor_context": (batch["labels"], batch["loss_mask"])}
    # Without labels GPTModel returns the vocab-parallel logits [b, s, V/tp] on the last stage.
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                 packed_seq_params=packed_seq_params, **extra)


def loss_sum_and_stats(cfg: StepConfig, tp_group, labels, loss_mask, output):
    """The last stage's output -> (sum of the loss over the loss tokens, stats `[b, s]`).

    output: the vocab-parallel logits `[b, s, V/tp]` (consumed in place), or the fused output
    layer's (loss sum, stats)."""
    if cfg.fused_linear:
        return output
    loss, stats = sft_token_loss(output, labels, cfg.loss, tp_group, inplace=True, with_entropy=cfg.with_entropy,
                                 vocab_size=cfg.vocab_size)
    loss_sum, _ = masked_sum_and_count(loss, loss_mask)
    return loss_sum, stats


def loss_func(cfg: StepConfig, tp_group, labels, loss_mask, output):
    """The last stage's output, labels [b, s] -> (loss sum, token count, report)."""
    loss_sum, stats = loss_sum_and_stats(cfg, tp_group, labels, loss_mask, output)
    report = token_metric_report(loss_sum, stats, loss_mask, cfg.loss.kind)
    if cfg.inject is not None:
        loss_sum = cfg.inject(loss_sum)
    if cfg.check_non_finite:
        check_loss(loss_sum)
    return loss_sum, loss_mask.sum().to(torch.int), report


def forward_step(cfg: StepConfig, data_iterator, model):
    """One micro-batch through the model; the loss follows in the returned loss_func."""
    groups = model_groups(model)
    batch = get_batch(data_iterator, cfg.batch, groups)
    output = model_forward(model, batch, cfg)
    labels, loss_mask = (batch["labels"], batch["loss_mask"]) if batch is not None else (None, None)
    return output, partial(loss_func, cfg, groups.tp, labels, loss_mask)
