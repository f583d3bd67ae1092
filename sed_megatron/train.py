"""SFT with SED-SFT, CE, DFT or GEM on Megatron-LM's training loop, at any TP x PP x DP.

    torchrun --nproc_per_node 2 -m sed_megatron.train --config examples/tiny_cpu.yaml [--flag value ...]

Flags on the command line win over the YAML; every Megatron-LM flag works (parallelism,
distributed optimizer, precision, checkpoints, logging). On a machine without CUDA the CPU
runtime layer is applied and gloo is used; on GPUs nothing is changed (NCCL, bf16, Transformer
Engine when installed).
"""

import functools
import os
import sys

from sed_megatron.compat import apply_cpu_training_runtime
from sed_megatron.training.arguments import calibrates_tau
from sed_megatron.training.setup import build_datasets, model_provider, parse_run_args, step_config


def _install_metrics_log(args):
    """metrics.jsonl: wrap Megatron's training_log, which train() calls after every iteration."""
    import megatron.training.training as training_loop
    from megatron.core import parallel_state

    from sed_megatron.training.metrics import MetricsLog

    path = args.metrics_file or os.path.join(args.save or ".", "metrics.jsonl")
    log = MetricsLog(path, tokens_per_iteration=args.global_batch_size * args.seq_length)
    training_log = training_loop.training_log

    @functools.wraps(training_log)
    def training_log_with_metrics(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                                  report_memory_flag, skipped_iter, grad_norm, *rest, **kwargs):
        result = training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                              report_memory_flag, skipped_iter, grad_norm, *rest, **kwargs)
        # loss_dict holds this iteration's values, already reduced over micro-batches and DP;
        # it is filled on the last pipeline stage only.
        writer = (loss_dict and parallel_state.get_tensor_model_parallel_rank() == 0
                  and parallel_state.get_data_parallel_rank() == 0)
        if writer and iteration % args.log_interval == 0:
            log.write(iteration, {key: float(value) for key, value in loss_dict.items()}, learning_rate,
                      grad_norm, extra={"skipped": int(skipped_iter)})
        return result

    training_loop.training_log = training_log_with_metrics
    return path


def _install_tau_calibration(args, step_cfg):
    """--sed-calibrate-ratio: set tau from the initial model right before the first step.

    Megatron's train() receives the built (and possibly loaded) model; the wrapper calibrates
    with it, stores tau in <save>/sed_tau.json and trains with it. A resumed run reads tau
    back from <load>/sed_tau.json instead of calibrating a model that has already trained.
    """
    import dataclasses
    import json
    import shutil

    import megatron.training.training as training_loop
    import torch.distributed as dist
    from megatron.training.utils import print_rank_0

    from sed_megatron.training.calibrate import calibrate_tau
    from sed_megatron.training.step import forward_step

    train = training_loop.train

    @functools.wraps(train)
    def train_with_calibrated_tau(forward_step_func, model, *rest, **kwargs):
        if args.iteration > 0:
            stored = os.path.join(args.load or "", "sed_tau.json")
            if not os.path.exists(stored):
                raise SystemExit(f"sed_megatron.train: error: resuming at iteration {args.iteration} with "
                                 f"--sed-calibrate-ratio needs the calibrated tau in {stored}")
            with open(stored) as f:
                tau = json.load(f)["tau"]
            print_rank_0(f"SED tau={tau!r} (calibrated earlier, read from {stored})")
            if args.save and os.path.abspath(args.save) != os.path.abspath(args.load) and dist.get_rank() == 0:
                os.makedirs(args.save, exist_ok=True)  # so a resume from the new directory finds it too
                shutil.copy(stored, os.path.join(args.save, "sed_tau.json"))
        else:
            n = args.sed_calibrate_samples
            dataset = build_datasets(args, [n, n, 0])[1]
            tau = calibrate_tau(model, dataset, n, step_cfg, step_cfg.loss.top_k, args.sed_calibrate_ratio,
                                args.sed_calibrate_tokens)
            print_rank_0(f"SED tau={tau!r} calibrated on {n} samples ({args.sed_calibrate_tokens} tokens, "
                         f"k={step_cfg.loss.top_k}, mask ratio {args.sed_calibrate_ratio})")
            if args.save and dist.get_rank() == 0:
                os.makedirs(args.save, exist_ok=True)
                with open(os.path.join(args.save, "sed_tau.json"), "w") as f:
                    json.dump({"tau": tau, "mask_ratio": args.sed_calibrate_ratio, "top_k": step_cfg.loss.top_k,
                               "samples": n, "tokens": args.sed_calibrate_tokens}, f)
        calibrated = dataclasses.replace(step_cfg, loss=dataclasses.replace(step_cfg.loss, tau=tau))
        return train(functools.partial(forward_step, calibrated), model, *rest, **kwargs)

    training_loop.train = train_with_calibrated_tau


def _keep_model_file(args):
    """A run loaded from a converted checkpoint saves its architecture file beside its own checkpoints."""
    import shutil

    import torch.distributed as dist

    from sed_megatron.convert.checkpoint import MODEL_FILE

    source = os.path.join(args.load or "", MODEL_FILE)
    if not (args.load and args.save and os.path.exists(source)):
        return
    if os.path.abspath(args.load) != os.path.abspath(args.save) and (not dist.is_initialized() or dist.get_rank() == 0):
        os.makedirs(args.save, exist_ok=True)
        shutil.copy(source, os.path.join(args.save, MODEL_FILE))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    on_cpu = apply_cpu_training_runtime()
    args, loss_cfg = parse_run_args(argv, on_cpu)

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from sed_megatron.training.step import forward_step

    step_cfg = step_config(args, loss_cfg)
    _install_metrics_log(args)
    _keep_model_file(args)
    if calibrates_tau(args):
        _install_tau_calibration(args, step_cfg)
    datasets_provider = functools.partial(build_datasets, args)
    cfg = pretrain_cfg_container_from_args(args, model_cfg=None)  # None: our model provider builds it
    pretrain(
        cfg,
        datasets_provider,
        ModelType.encoder_or_decoder,
        functools.partial(forward_step, step_cfg),
        model_provider=functools.partial(model_provider, args),
    )


if __name__ == "__main__":
    main()
