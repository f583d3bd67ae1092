"""SFT with SED-SFT, CE, DFT or GEM on Megatron-LM's training loop, at any TP x PP x DP.

    torchrun --nproc_per_node 2 -m sed_megatron.train --config examples/tiny_cpu.yaml [--flag value ...]

Flags on the command line win over the YAML; every Megatron-LM flag works (parallelism,
distributed optimizer, precision, checkpoints, logging). On a machine without CUDA the CPU
runtime layer is applied and gloo is used; on GPUs nothing is changed (NCCL, bf16, Transformer
Engine when installed).
"""

import argparse
import functools
import os
import sys

from sed_megatron.compat import apply_cpu_training_runtime


def _runtime_defaults(on_cpu):
    """Flags that come before the YAML and the command line (so either can override them)."""
    from sed_megatron.models.gpt import transformer_engine_available

    defaults = ["--calculate-per-token-loss", "--tokenizer-type", "NullTokenizer"]
    if on_cpu:
        defaults += ["--distributed-backend", "gloo", "--use-cpu-initialization", "--no-persist-layer-norm",
                     "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
                     "--no-rope-fusion"]
    if on_cpu or not transformer_engine_available():
        defaults += ["--transformer-impl", "local"]
    return defaults


def _fail(message):
    print(f"sed_megatron.train: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_args(argv, on_cpu):
    """(Megatron's validated args, LossConfig) from defaults + YAML + command line."""
    from megatron.training.arguments import add_megatron_arguments, parse_and_validate_args

    from sed_megatron.training.arguments import ConfigError, add_sed_arguments, expand_config

    parser = add_sed_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    try:
        expanded = expand_config(argv, parser)
    except ConfigError as err:
        _fail(str(err))
    full_argv = _runtime_defaults(on_cpu) + expanded
    loss_cfg = _loss_config(parser.parse_args(full_argv))  # our errors first, before Megatron's checks
    sys.argv = [sys.argv[0]] + full_argv
    return parse_and_validate_args(extra_args_provider=add_sed_arguments), loss_cfg


def _loss_config(args):
    from sed_megatron.training.arguments import LOSS_FLAGS, loss_config_from_args

    try:
        return loss_config_from_args(args)
    except ValueError as err:
        message = str(err)
        for field, flag in LOSS_FLAGS.items():
            message = message.replace(f"LossConfig.{field}:", f"{flag} (loss.{field}):")
        _fail(message)


def _datasets_provider(args, train_val_test_num_samples):
    """(train, valid, test) datasets of already tokenized samples."""
    from sed_megatron.data.simple import JsonlSFTDataset, SyntheticSFTDataset

    datasets = []
    for split, num_samples in enumerate(train_val_test_num_samples):
        length = max(int(num_samples or 0), 1)
        if args.sft_data_kind == "synthetic":
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


def _model_provider(args, pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    from megatron.training.argument_utils import core_transformer_config_from_args

    from sed_megatron.models.gpt import build_gpt_model

    config = config or core_transformer_config_from_args(args)
    return build_gpt_model(args, config, pre_process, post_process, vp_stage, pg_collection)


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


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    on_cpu = apply_cpu_training_runtime()
    args, loss_cfg = _parse_args(argv, on_cpu)

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from sed_megatron.training.step import StepConfig, forward_step

    step_cfg = StepConfig(
        loss=loss_cfg,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        with_entropy=args.log_entropy,
    )
    _install_metrics_log(args)
    datasets_provider = functools.partial(_datasets_provider, args)
    cfg = pretrain_cfg_container_from_args(args, model_cfg=None)  # None: our model provider builds it
    pretrain(
        cfg,
        datasets_provider,
        ModelType.encoder_or_decoder,
        functools.partial(forward_step, step_cfg),
        model_provider=functools.partial(_model_provider, args),
    )


if __name__ == "__main__":
    main()
