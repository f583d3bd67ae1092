"""A training run's settings, typed: Megatron's validated Namespace read once, here.

    run = run_config(args, loss_cfg)      # RunConfig: the step, the data, tau calibration, paths
    datasets = build_datasets(run.data, [n_train, n_valid, n_test])

The rest of sed_megatron's training code takes these objects. Megatron-LM itself keeps its
Namespace as its global state (its loop, checkpoints and counters read it); what changes while
a run goes (the iteration) is read from Megatron, not from here.
"""

import os
from dataclasses import dataclass

from .datasets import packs_thd


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from and how rows are made of them."""

    kind: str
    """synthetic, indexed (tools/preprocess_sft_data.py's prefix) or jsonl (pre-tokenized lines)."""
    path: str | None
    seq_length: int
    """Tokens per row (inputs; a sample holds seq_length + 1 ids)."""
    vocab_size: int | None
    seed: int
    """The synthetic samples' seed; the indexed split's and shuffle's."""
    valid_fraction: float
    """Share of the indexed samples held out for validation and tau calibration."""
    num_samples: int
    """Synthetic: distinct samples."""
    prompt_length: int
    """Synthetic: prompt tokens without loss."""
    pack: bool
    """Several samples per row, none attending to another."""
    packs_thd: bool
    """Packed rows carry their boundaries (THD attention: TE's, or the local CP attention's)
    instead of a block-diagonal mask."""
    attention_mask: bool
    """Rows carry the causal mask the local attention expects."""
    cp_size: int
    """Context-parallel ranks (THD samples are padded to a multiple of 2 x cp_size)."""


@dataclass(frozen=True)
class TauCalibration:
    """Tau from the initial model before the first step (--sed-calibrate-*)."""

    ratio: float
    """r: the share of tokens left without the penalty; tau is the (1 - r) quantile."""
    samples: int
    tokens: str
    """response, all or published (loss.tau.TOKEN_SETS)."""
    top_k: int
    """k of the top-k mass it is taken over."""


@dataclass(frozen=True)
class RunConfig:
    step: object
    """The forward step's StepConfig (training/step.py)."""
    data: DataConfig
    tau_calibration: TauCalibration | None
    """None: tau is given, or the kind reads none."""
    load: str | None
    save: str | None
    metrics_file: str
    log_interval: int
    tokens_per_iteration: int
    """Global batch rows x sequence length (padding included): the throughput's unit."""
    lora: object = None
    """The LoRAConfig (sed_megatron.lora) of a LoRA run; None: full fine-tuning."""
    lora_base: str | None = None
    """The base checkpoint the adapters started from (--load, or what the LoRA checkpoint in --load records)."""
    lora_loaded: bool = False
    """--load holds adapters already (a LoRA checkpoint: resume or continue), not a base alone."""
    lora_parameters: int = 0
    """The adapters' parameters over the whole model (what trains)."""
    keep_last: int | None = None
    """--save-keep-last: checkpoints kept in --save after each save (None: all)."""
    save_error: tuple | None = None
    """--inject-save-error: (iteration, errno) of the save whose write fails (testing)."""


def data_config(args):
    return DataConfig(
        kind=args.sft_data_kind, path=args.sft_data_path, seq_length=args.seq_length, vocab_size=args.vocab_size,
        seed=args.sft_data_seed, valid_fraction=args.sft_valid_fraction, num_samples=args.sft_num_samples,
        prompt_length=args.sft_prompt_length, pack=args.sft_pack, packs_thd=packs_thd(args),
        attention_mask=args.create_attention_mask_in_dataloader, cp_size=args.context_parallel_size)


def run_config(args, loss_cfg) -> RunConfig:
    """The typed settings of a run from Megatron's validated args and its LossConfig."""
    from .arguments import calibrates_tau, calibration_top_k_from_args, lora_config_from_args
    from .checkpoints import parse_save_error
    from .provider import step_config

    calibration = None
    if calibrates_tau(args):
        calibration = TauCalibration(ratio=args.sed_calibrate_ratio, samples=args.sed_calibrate_samples,
                                     tokens=args.sed_calibrate_tokens, top_k=calibration_top_k_from_args(args))
    return RunConfig(
        step=step_config(args, loss_cfg), data=data_config(args), tau_calibration=calibration, load=args.load,
        save=args.save, metrics_file=args.metrics_file or os.path.join(args.save or ".", "metrics.jsonl"),
        log_interval=args.log_interval, tokens_per_iteration=args.global_batch_size * args.seq_length,
        keep_last=getattr(args, "save_keep_last", None),
        save_error=parse_save_error(args.inject_save_error) if getattr(args, "inject_save_error", None) else None,
        **_lora_fields(args, lora_config_from_args(args)))


def _lora_fields(args, lora):
    from sed_megatron.lora import adapter_parameter_count, read_lora_file
    from sed_megatron.world import model_config_from_args

    if lora is None:
        return {}
    from sed_megatron.lora.checkpoint import base_checkpoint_dir

    stored = read_lora_file(args.load) if args.load else None
    base = base_checkpoint_dir(args.load, stored[1]) if stored else os.path.abspath(args.load)
    return {"lora": lora, "lora_base": base, "lora_loaded": stored is not None,
            "lora_parameters": adapter_parameter_count(model_config_from_args(args), lora)}
