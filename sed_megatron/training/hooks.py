"""The two places where sed_megatron hooks into Megatron-LM's training loop.

- `train` receives the built (and possibly loaded) model once, before the first step: there we
  learn the model's process groups, calibrate τ if asked, and hand the forward step to Megatron.
- `training_log` runs after every iteration with that iteration's reduced report: there we
  append the metrics.jsonl record. For an MoE model Megatron's MoE metrics tracker reports the
  routers' load-balancing loss inside it (reduced over pipeline stages and DP, the mean over
  MoE layers and micro-batches); a tracker that keeps that report's losses (installed through
  Megatron's set_moe_metrics_tracker) hands them to the record.

Each wrapped function is checked against the parameters the wrapper relies on (on every
machine), so a megatron-core whose loop changed stops with one line instead of misbehaving.
"""

import functools
import sys

import torch.distributed as dist

from sed_megatron.runtime import check_signature

from ..parallel import model_groups, pipeline_stage
from .nonfinite import describe

TRAIN_PARAMS = ("forward_step_func", "model", "optimizer", "opt_param_scheduler", "train_data_iterator")
TRAINING_LOG_PARAMS = ("loss_dict", "total_loss_dict", "learning_rate", "iteration", "loss_scale",
                       "report_memory_flag", "skipped_iter", "grad_norm")


def _reset_interval(total_loss_dict):
    """What Megatron's training_log does after every line but the first."""
    for key, value in total_loss_dict.items():
        if hasattr(value, "zero_"):
            value.zero_()
        else:
            total_loss_dict[key] = 0


def writes_metrics(groups):
    """One rank writes the metrics: the first of TP, CP and DP on the last pipeline stage (where
    Megatron fills the report)."""
    _, last = pipeline_stage(groups.pp)
    return last and all(dist.get_rank(group=group) == 0 for group in (groups.tp, groups.cp, groups.dp))


def loss_keeping_tracker():
    """Megatron's MoE metrics tracker, which also keeps the losses its last report() added to the
    loop's accumulators (`load_balancing_loss`: the iteration's load-balancing loss, before its
    coefficient); take_losses() hands them over once."""
    from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker

    check_signature(MoEMetricsTracker.report, ("self", "loss_scale"), "sed_megatron's moe_aux_loss in metrics.jsonl "
                    "(sed_megatron/training/hooks.py)", keywords=("total_loss_dict",))

    class LossKeepingTracker(MoEMetricsTracker):
        def __init__(self):
            super().__init__()
            self._losses = {}

        def report(self, *args, total_loss_dict=None, **kwargs):
            if total_loss_dict is None:
                return super().report(*args, **kwargs)
            added = {}  # Megatron puts the metrics whose name ends in "loss" here ...
            text = super().report(*args, total_loss_dict=added, **kwargs)
            for key, value in added.items():  # ... and we pass them on as its report does
                total_loss_dict[key] = total_loss_dict[key] + value if key in total_loss_dict else value
            self._losses = {key: float(value) for key, value in added.items()}
            return text

        def take_losses(self):
            losses, self._losses = self._losses, {}
            return losses

    return LossKeepingTracker()


def install(before_training, metrics_log, log_interval, current_iteration, prog="sed_megatron.train", loop=None,
            start_iteration=None):
    """Wrap Megatron's train and training_log.

    before_training(model_chunks) -> forward_step_func: runs once, with the model, before the
    first step (τ calibration goes here). metrics_log.write(iteration, report, lr, grad_norm,
    extra) appends one record every log_interval iterations, on one rank. A NaN or Inf loss or
    gradient stops the run with one line naming current_iteration() and exit code 3.

    start_iteration() -> the iteration the loop starts after (the loaded one).
    loop (training/resume.py's LoopSupervisor), if given: started(iteration, writes_metrics,
    forward_step) -> forward_step before the first step, iteration_done(iteration) after each
    (every rank), paused() around checkpoint saves and evaluations, ended() when the loop ends."""
    import megatron.training.training as training_loop
    from megatron.core.transformer.moe.moe_logging import set_moe_metrics_tracker

    train, training_log = training_loop.train, training_loop.training_log
    check_signature(train, TRAIN_PARAMS, "sed_megatron's hook on the training loop (sed_megatron/training/hooks.py)")
    check_signature(training_log, TRAINING_LOG_PARAMS, "sed_megatron's metrics.jsonl (sed_megatron/training/hooks.py)",
                    keywords=("is_first_iteration",))
    writer = []  # decided once the model, and so its process groups, exist
    moe_tracker = loss_keeping_tracker()
    set_moe_metrics_tracker(moe_tracker)  # before any router records into Megatron's default one

    @functools.wraps(train)
    def train_with_hooks(forward_step_func, model, *rest, **kwargs):
        writer.append(writes_metrics(model_groups(model[0])))
        forward_step = before_training(model)
        # The iteration the loop starts after: the loaded checkpoint's (Megatron sets curr_iteration in the loop).
        start = start_iteration() if start_iteration is not None else current_iteration() - 1
        metrics_log.start(start)
        if loop is not None:
            forward_step = loop.started(start, writer[0], forward_step)
        try:
            return train(forward_step, model, *rest, **kwargs)
        except RuntimeError as err:
            what = describe(err)
            if what is None:
                raise
            iteration = current_iteration()
            # Raised before the optimizer step: the weights and every checkpoint are clean.
            line = f"iteration {iteration}: {what}"
            print(f"{prog}: error: {line}; stopped before the optimizer step, no checkpoint holds this iteration "
                  f"(resume from the last one in --save)", file=sys.stderr, flush=True)
            from .resume import record_error

            record_error(line)
            sys.exit(3)
        finally:
            if loop is not None:
                loop.ended()

    @functools.wraps(training_log)
    def training_log_with_metrics(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                                  report_memory_flag, skipped_iter, grad_norm, *rest, **kwargs):
        result = training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                              report_memory_flag, skipped_iter, grad_norm, *rest, **kwargs)
        first = kwargs.get("is_first_iteration", False)
        if first:
            # Megatron prints the first iteration but keeps its sums, so its next line would
            # average that iteration in again; start the next interval afresh instead.
            _reset_interval(total_loss_dict)
        # loss_dict holds this iteration's values, already reduced over micro-batches and DP;
        # it is filled on the last pipeline stage.
        moe_losses = moe_tracker.take_losses()  # on every rank: the report just reduced them
        if writer and writer[0] and loss_dict:
            metrics_log.add({**loss_dict, **moe_losses}, skipped_iter)
            if iteration % log_interval == 0 or first:  # when Megatron prints its line
                metrics_log.write(iteration, learning_rate, grad_norm)
        if loop is not None:
            loop.iteration_done(iteration)
        return result

    training_loop.train = train_with_hooks
    training_loop.training_log = training_log_with_metrics
    if loop is not None:  # a save or an evaluation is not a hang
        for name in ("save_checkpoint_and_time", "evaluate_and_print_results"):
            setattr(training_loop, name, _paused_by(loop, getattr(training_loop, name)))


def _paused_by(loop, fn):
    @functools.wraps(fn)
    def paused(*args, **kwargs):
        with loop.paused():
            return fn(*args, **kwargs)

    return paused


def after_saves(after):
    """Wrap Megatron's save_checkpoint_and_time: after(iteration) runs on every rank once a save
    returned (saves are synchronous: the checkpoint is complete and the tracker names it); not
    after non-persistent (local) checkpoints."""
    import megatron.training.training as training_loop

    save = training_loop.save_checkpoint_and_time
    check_signature(save, ("iteration", "model"), "sed_megatron's hook after each save (sed_megatron/training/hooks.py)",
                    keywords=("non_persistent_ckpt",))

    @functools.wraps(save)
    def save_then(iteration, *args, **kwargs):
        result = save(iteration, *args, **kwargs)
        if not kwargs.get("non_persistent_ckpt", False):
            after(iteration)
        return result

    training_loop.save_checkpoint_and_time = save_then
