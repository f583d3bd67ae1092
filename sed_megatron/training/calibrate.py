"""τ calibration on Megatron models: forward only, any TP x PP x CP x DP, exact across ranks.

The calibration samples are split over data-parallel ranks (rank d takes samples d, d + D, ...),
run one per micro-batch without gradients through the same batch pipeline and model call as
training (the fused output-layer loss included, when training uses it) (so packed THD rows keep their samples apart here too, and each context-parallel
rank scores its own chunks of every sample), and the global top-k mass of the chosen tokens
is gathered from every DP x CP rank before the quantile is taken: the same set of values,
whatever the layout.
"""

import dataclasses
import functools

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from sed_megatron.loss import LossConfig
from sed_megatron.loss.tau import calibration_top_k, gather_values, select_tokens, tau_from_topk_mass

from ..parallel import model_groups, pipeline_stage
from .batch import get_batch
from .step import StepConfig, loss_sum_and_stats, model_forward


def _calibration_loss(step_cfg: StepConfig, token_set, tp_group, sink, labels, loss_mask, output):
    _, stats = loss_sum_and_stats(step_cfg, tp_group, labels, loss_mask, output)
    sink.append(select_tokens(stats["topk_mass"], labels, loss_mask, token_set).float())
    return torch.zeros((), device=labels.device), torch.ones((), dtype=torch.int), {}


def _calibration_step(step_cfg: StepConfig, token_set, sink, progress, data_iterator, model):
    groups = model_groups(model)
    if progress is not None:
        progress.update()
    batch = get_batch(data_iterator, step_cfg.batch, groups)
    output = model_forward(model, batch, step_cfg)
    labels, loss_mask = (batch["labels"], batch["loss_mask"]) if batch is not None else (None, None)
    return output, functools.partial(_calibration_loss, step_cfg, token_set, groups.tp, sink, labels, loss_mask)


def calibration_rows(dataset, num_samples, token_set="response"):
    """(dataset, rows) that hold the first num_samples samples: the samples themselves, or the
    packed rows of exactly those samples (a packed dataset's `first_samples`), so that packing
    neither changes the calibration set nor scores more than num_samples samples. The published
    token set reads them through the dataset's `with_full_input()` (every id an input)."""
    if token_set == "published":
        if not hasattr(dataset, "with_full_input"):
            raise ValueError(f"the published calibration needs a dataset with `with_full_input()`, got {type(dataset)}")
        dataset = dataset.with_full_input()
    first_samples = getattr(dataset, "first_samples", None)
    if first_samples is None:
        return dataset, num_samples
    packed = first_samples(num_samples)
    return packed, len(packed)


def local_topk_masses(model_chunks, dataset, num_samples, step_cfg: StepConfig, token_set, progress=False):
    """This rank's share of the calibration values (empty except on the last pipeline stage):
    the tokens of its samples (split over DP) that its CP rank holds.

    The top-k mass uses k = step_cfg.loss.top_k (the caller's calibration k). progress: a bar
    on stderr (global rank 0) over this rank's samples."""
    dp_group = model_groups(model_chunks[0]).dp
    dp_rank, dp_size = dist.get_rank(group=dp_group), dist.get_world_size(group=dp_group)
    dataset, num_rows = calibration_rows(dataset, num_samples, token_set)
    if num_rows < dp_size:
        raise ValueError(f"{num_samples} calibration samples ({num_rows} rows) cannot be split over {dp_size} "
                         f"data-parallel ranks")
    indices = range(dp_rank, num_rows, dp_size)
    rows = [dataset[i] for i in indices]
    if token_set == "published":
        _report_unscored_past_end(rows, num_samples, step_cfg.batch.seq_length, dp_group)
    samples = iter([{key: value.unsqueeze(0) for key, value in row.items()} for row in rows])
    # One sample per micro-batch (no partial micro-batches); the loss kind does not matter: CE.
    step_cfg = dataclasses.replace(step_cfg, loss=LossConfig(top_k=step_cfg.loss.top_k), with_entropy=False,
                                   batch=dataclasses.replace(step_cfg.batch, micro_batch_size=1))
    sink = []
    bar = None
    if progress and dist.get_rank() == 0:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc="calibration", unit=" samples", file=sys.stderr)
    was_training = [chunk.training for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=functools.partial(_calibration_step, step_cfg, token_set, sink, bar),
            data_iterator=samples,
            model=model_chunks,
            num_microbatches=len(indices),
            seq_length=step_cfg.batch.seq_length,
            micro_batch_size=1,
            forward_only=True,
        )
    for chunk, training in zip(model_chunks, was_training):
        chunk.train(training)
    if bar is not None:
        bar.close()
    return torch.cat(sink) if sink else torch.empty(0)


def _report_unscored_past_end(rows, num_samples, seq_length, dp_group):
    """One line on stderr (global rank 0) when samples fill seq_length, so that the published
    calibration could not score the position past their last id."""
    count = torch.tensor([sum(int(row.get("unscored_past_end", 0)) for row in rows)],
                         device=torch.cuda.current_device())
    dist.all_reduce(count, group=dp_group)
    if int(count[0]) and dist.get_rank() == 0:
        import sys

        print(f"sed_megatron: published calibration: {int(count[0])} of {num_samples} samples fill --seq-length "
              f"{seq_length}; scored without the position past their last token", file=sys.stderr, flush=True)


def calibrate_tau(model_chunks, dataset, num_samples, step_cfg: StepConfig, mask_ratio, token_set, progress=False):
    """τ from the model as it is now, with k = step_cfg.loss.top_k (the calibration k: see
    sed_megatron.loss.tau.calibration_top_k); the same float on every rank."""
    groups = model_groups(model_chunks[0])
    values = local_topk_masses(model_chunks, dataset, num_samples, step_cfg, token_set, progress)
    # On the communication device (the current GPU; the CPU under the CPU runtime layer).
    tau = torch.zeros(1, dtype=torch.float64, device=torch.cuda.current_device())
    _, last = pipeline_stage(groups.pp)
    if last:
        # DP ranks scored different samples, CP ranks different tokens of the same samples.
        tau[0] = tau_from_topk_mass(gather_values(values, groups.dp_cp), mask_ratio)
    # Every last-stage rank now holds the same tau; it reaches the other stages of its pipeline.
    dist.broadcast(tau, src=dist.get_global_rank(groups.pp, dist.get_world_size(group=groups.pp) - 1), group=groups.pp)
    return float(tau[0])


def calibrate_from_args(args, runtime, mask_ratio, num_samples, token_set, split="valid", progress=False,
                        top_k=None):
    """τ of the run that Megatron's parsed `args` describe: its model (random init, or the weights
    of args.load), its data split, with k = top_k or the default of `calibration_top_k` (the
    run's --sed-top-k; 10 for the published token set). Initializes Megatron; every rank returns τ."""
    from megatron.core.enums import ModelType
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import get_model

    from sed_megatron.world import model_provider

    from .datasets import build_datasets
    from .provider import step_config
    from .run_config import data_config

    initialize_megatron(allow_no_cuda=runtime.on_cpu)
    model = get_model(functools.partial(model_provider, args), ModelType.encoder_or_decoder, wrap_with_ddp=False)
    if args.load:
        # Weights only: no optimizer, scheduler or RNG state, whatever the checkpoint holds.
        args.finetune, args.no_load_optim, args.no_load_rng = True, True, True
        load_checkpoint(model, None, None)
    dataset = build_datasets(data_config(args), [num_samples, num_samples, 0])[0 if split == "train" else 1]
    step_cfg = step_config(args, LossConfig(top_k=calibration_top_k(token_set, args.sed_top_k, top_k)))
    return calibrate_tau(model, dataset, num_samples, step_cfg, mask_ratio, token_set, progress)
