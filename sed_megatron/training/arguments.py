"""Command line and YAML configuration of a training run.

A run is configured by Megatron-LM's own flags plus the SED-SFT group below. A YAML file
(`--config`) holds the same settings, grouped by concern:

    model:       {num_layers: 2, hidden_size: 64, ...}       # Megatron-LM flags
    parallel:    {tensor_model_parallel_size: 2, ...}        # Megatron-LM flags
    training:    {train_iters: 20, micro_batch_size: 2, ...} # Megatron-LM flags
    optimizer:   {lr: 1.0e-3, ...}                           # Megatron-LM flags
    checkpoint:  {save: runs/x, save_interval: 10, ...}      # Megatron-LM flags
    logging:     {log_interval: 1, ...}                      # Megatron-LM flags
    loss:        {kind: sed, top_k: 2, tau: 0.6, ...}        # LossConfig fields
    data:        {kind: synthetic, ...}                      # DataConfig fields

A Megatron key is a flag's name with '_' for '-' (`no_gradient_accumulation_fusion: true` is
`--no-gradient-accumulation-fusion`); it is checked against Megatron's own parser, so an
unknown key is an error naming the file and key. The YAML becomes command-line arguments that
come first, so any flag given on the command line wins.
"""

import argparse

import yaml

from sed_megatron.calibration import PUBLISHED_TOP_K, TOKEN_SETS, calibration_top_k
from sed_megatron.loss import GEM_H, LOSS_KINDS, SED_MASKS
from sed_megatron.loss.fused_linear import SCHEMES as FUSED_MODES

MEGATRON_SECTIONS = ("model", "parallel", "training", "optimizer", "checkpoint", "logging")

LOSS_FLAGS = {  # LossConfig field -> flag
    "kind": "--loss-type",
    "top_k": "--sed-top-k",
    "tau": "--sed-tau",
    "lam": "--sed-lambda",
    "mask": "--sed-mask",
    "gem_beta": "--gem-beta",
    "gem_h": "--gem-h",
    "calibrate_ratio": "--sed-calibrate-ratio",
    "calibrate_samples": "--sed-calibrate-samples",
    "calibrate_tokens": "--sed-calibrate-tokens",
    "calibrate_top_k": "--sed-calibrate-top-k",
    "fused_linear": "--sft-fused-linear",
    "fused_mode": "--sft-fused-mode",
    "fused_chunk_tokens": "--sft-fused-chunk-tokens",
}
DATA_FLAGS = {  # DataConfig field -> flag
    "kind": "--sft-data-kind",
    "path": "--sft-data-path",
    "num_samples": "--sft-num-samples",
    "prompt_length": "--sft-prompt-length",
    "seed": "--sft-data-seed",
    "valid_fraction": "--sft-valid-fraction",
    "pack": "--sft-pack",
}
RUN_FLAGS = {  # run-level keys at the top of the YAML -> flag
    "log_entropy": "--log-entropy",
    "metrics_file": "--metrics-file",
}


_OWN_KEYS = {flag[2:].replace("-", "_") for table in (LOSS_FLAGS, DATA_FLAGS, RUN_FLAGS) for flag in table.values()}
_OWN_KEYS.update({"config", "verbose", "help_megatron"})


class ConfigError(ValueError):
    """A bad configuration file or value; the message names the file and key."""


def add_sed_arguments(parser):
    """The SED-SFT argument group (Megatron's extra_args_provider)."""
    group = parser.add_argument_group("sed-sft")
    group.add_argument("--config", default=None, help="YAML run configuration (flags on the command line win)")
    group.add_argument("--verbose", action="store_true",
                       help="also print Megatron-LM's argument dump and its notices about optional kernels")
    group.add_argument("--help-megatron", action="store_true", help="list every Megatron-LM flag (about 900) and exit")
    group.add_argument("--loss-type", default="ce", choices=LOSS_KINDS, help="token loss")
    group.add_argument("--sed-top-k", type=int, default=2, help="k of the top-k mass that decides the SED mask")
    group.add_argument("--sed-tau", type=float, default=None, help="SED threshold on the top-k mass")
    group.add_argument("--sed-lambda", type=float, default=1.0, help="weight of the SED penalty")
    group.add_argument("--sed-mask", default="topk_mass", choices=SED_MASKS, help="where SED applies")
    group.add_argument("--gem-beta", type=float, default=0.7, help="GEM temperature")
    group.add_argument("--gem-h", default="linear", choices=GEM_H,
                       help="GEM's h: linear (SED-SFT's GEM baseline) or logsigmoid (GEM's own repository)")
    group.add_argument("--sed-calibrate-ratio", type=float, default=None,
                       help="calibrate tau before the first step as the (1 - r) quantile of the initial "
                            "model's top-k mass, r = this masking ratio (--sed-tau, if given, wins)")
    group.add_argument("--sed-calibrate-samples", type=int, default=100, help="validation samples for it")
    group.add_argument("--sed-calibrate-tokens", default="response", choices=TOKEN_SETS,
                       help="tokens whose top-k mass sets tau: response (the loss tokens), all (every position "
                            "with a target, prompt included), or published: reproduces the published calibration: "
                            "every position of the full input incl. prompt and the last token, k = 10 unless "
                            "--sed-calibrate-top-k is given; not the default because it calibrates with another k "
                            "than training and on prompt tokens (a sample that fills --seq-length has no room for "
                            "the position past its last token: it is scored without it, and a line says how many)")
    group.add_argument("--sed-calibrate-top-k", type=int, default=None,
                       help="k of the top-k mass that calibrates tau (default: --sed-top-k, the k of training; "
                            f"{PUBLISHED_TOP_K} with --sed-calibrate-tokens published)")
    group.add_argument("--sft-fused-linear", action="store_true",
                       help="the output layer and the loss chunk by chunk of tokens: no [tokens, V/tp] logits "
                            "(fused_linear_sft_loss; the same loss, tau calibration included)")
    group.add_argument("--sft-fused-mode", default=None, choices=list(FUSED_MODES),
                       help="gradient scheme of --sft-fused-linear: grad-in-forward (3 GEMMs; holds dL/dhidden "
                            "[tokens, h] from the forward to the backward) or recompute (4 GEMMs: the logits again "
                            "in the backward; the least memory). Default: grad-in-forward (measured: "
                            "docs/PERFORMANCE.md)")
    group.add_argument("--sft-fused-chunk-tokens", type=int, default=None,
                       help="tokens per chunk of --sft-fused-linear (default: about 2^27 logits per chunk on a "
                            "GPU with grad-in-forward, 2^26 with recompute, 2^24 on CPU)")
    group.add_argument("--sft-data-kind", default="synthetic", choices=["synthetic", "indexed", "jsonl"],
                       help="synthetic: a seeded memorization set; indexed: the prefix written by "
                            "tools/preprocess_sft_data.py; jsonl: pre-tokenized {tokens, loss_mask} lines")
    group.add_argument("--sft-data-path", default=None, help="the indexed dataset prefix, or the JSONL file")
    group.add_argument("--sft-pack", action="store_true",
                       help="indexed: pack several samples per row, none attending to another: packed-sequence "
                            "(THD) attention with Transformer Engine or context parallelism (each sample padded "
                            "to a multiple of 2 x CP), else a block-diagonal causal mask")
    group.add_argument("--sft-valid-fraction", type=float, default=0.01,
                       help="indexed: share of the samples held out for validation (and tau calibration)")
    group.add_argument("--sft-num-samples", type=int, default=64, help="synthetic: number of distinct samples")
    group.add_argument("--sft-prompt-length", type=int, default=8, help="synthetic: prompt tokens without loss")
    group.add_argument("--sft-data-seed", type=int, default=1234,
                       help="synthetic: seed of the samples; indexed: seed of the split and the shuffling")
    group.add_argument("--log-entropy", action="store_true",
                       help="report the entropy of the predicted distribution (one more pass in the loss)")
    group.add_argument("--inject-non-finite", default=None, metavar="ITERATION:loss|grad",
                       help="testing: make the loss (or only its gradients) NaN at that iteration, to see the run "
                            "stop before the optimizer step")
    group.add_argument("--metrics-file", default=None,
                       help="JSON-lines metrics (default: metrics.jsonl in --save, else in the working directory)")
    return parser


def option_names(parser):
    """{dest: its long option}, for messages that name a setting."""
    return {action.dest: option for option, action in _option_actions(parser).values()}


def _option_actions(parser):
    """'flag_name' (dashes as underscores) -> argparse action, for every long option."""
    actions = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                actions[option[2:].replace("-", "_")] = (option, action)
    return actions


def _value_to_argv(option, action, value, where):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {option} is a switch; expected true or false, got {value!r}")
        return [option] if value else []
    if value is None:
        return []
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {option} takes a value, not {value!r}")
    if isinstance(value, list):
        if action.nargs in (None, 0, "?"):
            raise ConfigError(f"{where}: {option} takes one value, got a list")
        return [option] + [str(v) for v in value]
    if isinstance(value, dict):
        raise ConfigError(f"{where}: {option} takes a value, got a mapping")
    return [option, str(value)]


def yaml_flags_to_argv(flags, parser, where, sources=None):
    """Command-line arguments for a mapping of Megatron-LM flags (YAML keys).

    sources, if given, records where each setting came from: {dest: "where.key"}."""
    actions = _option_actions(parser)
    argv = []
    for key, value in flags.items():
        if key not in actions or key in _OWN_KEYS:
            raise ConfigError(f"{where}.{key}: unknown Megatron-LM flag --{key.replace('_', '-')}")
        argv += _value_to_argv(*actions[key], value, f"{where}.{key}")
        if sources is not None:
            sources[actions[key][1].dest] = f"{where}.{key}"
    return argv


def yaml_to_argv(path, parser, sources=None):
    """The command-line arguments equivalent to the YAML file at `path` (sources: as above)."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    actions = _option_actions(parser)
    argv = []
    for section, body in doc.items():
        if section in RUN_FLAGS:
            option, action = actions[RUN_FLAGS[section][2:].replace("-", "_")]
            argv += _value_to_argv(option, action, body, f"{path}: {section}")
            if sources is not None:
                sources[action.dest] = f"{path}: {section}"
            continue
        if section not in MEGATRON_SECTIONS + ("loss", "data"):
            known = ", ".join(MEGATRON_SECTIONS + ("loss", "data") + tuple(RUN_FLAGS))
            raise ConfigError(f"{path}: unknown section {section!r} (known: {known})")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        for key, value in body.items():
            where = f"{path}: {section}.{key}"
            if section in ("loss", "data"):
                table = LOSS_FLAGS if section == "loss" else DATA_FLAGS
                if key not in table:
                    raise ConfigError(f"{where}: unknown key (known: {', '.join(table)})")
                option, action = actions[table[key][2:].replace("-", "_")]
                argv += _value_to_argv(option, action, value, where)
                if sources is not None:
                    sources[action.dest] = where
                continue
            argv += yaml_flags_to_argv({key: value}, parser, f"{path}: {section}", sources)
    return argv


def config_path_from_argv(argv):
    """The value of --config in argv, or None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def expand_config(argv, parser, sources=None):
    """argv with the YAML of --config spliced in front, so the command line wins.

    sources, if given, records {dest: "path: section.key"} for the YAML's settings; settings
    given on the command line are left out of it (their flag names them)."""
    path = config_path_from_argv(argv)
    if path is None:
        return list(argv)
    yaml_argv = yaml_to_argv(path, parser, sources)
    if sources is not None:
        actions = _option_actions(parser)
        for arg in argv:
            if arg.startswith("--") and arg[2:].split("=")[0].replace("-", "_") in actions:
                sources.pop(actions[arg[2:].split("=")[0].replace("-", "_")][1].dest, None)
    return yaml_argv + list(argv)



def calibrates_tau(args):
    """Whether tau comes from calibration before the first step (an explicit tau wins)."""
    return args.loss_type == "sed" and args.sed_calibrate_ratio is not None and args.sed_tau is None


def calibration_top_k_from_args(args):
    """k of the calibration: --sed-calibrate-top-k, else 10 (published tokens) or --sed-top-k."""
    return calibration_top_k(args.sed_calibrate_tokens, args.sed_top_k, args.sed_calibrate_top_k)


def loss_config_from_args(args):
    """The LossConfig of the parsed arguments (read once; library code never sees args).

    With --sed-calibrate-ratio (and no --sed-tau, which wins), tau is left at 1.0 here and set
    by the calibration that runs before the first step.
    """
    from sed_megatron.loss import LossConfig

    tau = args.sed_tau
    if args.sed_calibrate_top_k is not None and args.sed_calibrate_top_k < 1:
        raise ValueError(f"LossConfig.calibrate_top_k: must be an integer >= 1, got {args.sed_calibrate_top_k}")
    if calibrates_tau(args):
        if not 0.0 <= args.sed_calibrate_ratio <= 1.0:
            raise ValueError(f"LossConfig.calibrate_ratio: must lie in [0, 1], got {args.sed_calibrate_ratio}")
        tau = 1.0
    return LossConfig(
        kind=args.loss_type, top_k=args.sed_top_k, tau=tau, lam=args.sed_lambda,
        mask=args.sed_mask, gem_beta=args.gem_beta, gem_h=args.gem_h,
    )


def write_config_with_tau(source, target, tau):
    """The YAML at source with loss.tau set, written to target (whole or not at all)."""
    from sed_megatron.utils import atomic_write_text

    with open(source) as f:
        config = yaml.safe_load(f) or {}
    config.setdefault("loss", {})["tau"] = tau
    atomic_write_text(target, yaml.safe_dump(config, sort_keys=False))
