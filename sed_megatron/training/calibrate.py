"""τ calibration on Megatron models: forward only, any TP x PP x DP, exact across DP ranks.

The calibration samples are split over data-parallel ranks (rank d takes samples d, d + D, ...),
run one per micro-batch through the model without gradients, and the global top-k mass of
the chosen tokens is gathered from every DP rank before the quantile is taken.
"""

import dataclasses
import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from sed_megatron.calibration import gather_values, select_tokens, tau_from_topk_mass
from sed_megatron.loss import LossConfig, sft_token_loss

from .step import StepConfig, get_batch


def _calibration_loss(step_cfg, top_k, token_set, sink, labels, loss_mask, logits):
    _, stats = sft_token_loss(logits, labels, LossConfig(kind="ce", top_k=top_k),
                              parallel_state.get_tensor_model_parallel_group(), inplace=True,
                              vocab_size=step_cfg.vocab_size)
    sink.append(select_tokens(stats["topk_mass"], labels, loss_mask, token_set).float())
    return logits.new_zeros(()), torch.ones((), dtype=torch.int), {}


def _calibration_step(step_cfg, top_k, token_set, sink, data_iterator, model):
    batch = get_batch(data_iterator, step_cfg)
    if batch is None:
        return model(None, None, None), functools.partial(_calibration_loss, step_cfg, top_k, token_set, sink, None, None)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    return output, functools.partial(_calibration_loss, step_cfg, top_k, token_set, sink, batch["labels"],
                                     batch["loss_mask"])


def local_topk_masses(model_chunks, dataset, num_samples, step_cfg: StepConfig, top_k, token_set):
    """This rank's share of the calibration values (empty except on the last pipeline stage)."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    if num_samples < dp_size:
        raise ValueError(f"{num_samples} calibration samples cannot be split over {dp_size} data-parallel ranks")
    indices = range(dp_rank, num_samples, dp_size)
    samples = iter([{key: value.unsqueeze(0) for key, value in dataset[i].items()} for i in indices])
    step_cfg = dataclasses.replace(step_cfg, micro_batch_size=1)  # no partial micro-batches
    sink = []
    was_training = [chunk.training for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=functools.partial(_calibration_step, step_cfg, top_k, token_set, sink),
            data_iterator=samples,
            model=model_chunks,
            num_microbatches=len(indices),
            seq_length=step_cfg.seq_length,
            micro_batch_size=1,
            forward_only=True,
        )
    for chunk, training in zip(model_chunks, was_training):
        chunk.train(training)
    return torch.cat(sink) if sink else torch.empty(0)


def calibrate_tau(model_chunks, dataset, num_samples, step_cfg, top_k, mask_ratio, token_set):
    """τ from the model as it is now; the same float on every rank."""
    values = local_topk_masses(model_chunks, dataset, num_samples, step_cfg, top_k, token_set)
    # On the communication device (the current GPU; the CPU under the CPU runtime layer).
    tau = torch.zeros(1, dtype=torch.float64, device=torch.cuda.current_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        all_values = gather_values(values, parallel_state.get_data_parallel_group())
        tau[0] = tau_from_topk_mass(all_values, mask_ratio)
    dist.broadcast(tau, src=dist.get_world_size() - 1)  # the last rank is on the last stage
    return float(tau[0])
