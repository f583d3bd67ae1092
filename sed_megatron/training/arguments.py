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
    lora:        {rank: 16, alpha: 32, ...}                  # LoRAConfig fields (absent: full fine-tuning)

A Megatron key is a flag's name with '_' for '-' (`no_gradient_accumulation_fusion: true` is
`--no-gradient-accumulation-fusion`); it is checked against Megatron's own parser, so an
unknown key is an error naming the file and key. The YAML becomes command-line arguments that
come first, so any flag given on the command line wins.
"""

import argparse
import os

import yaml

from sed_megatron.data.reasoning import DEFAULT_MODE as DEFAULT_REASONING
from sed_megatron.data.reasoning import MODES as REASONING_MODES
from sed_megatron.data.schemas import SCHEMAS
from sed_megatron.data.sft_preprocess import TRUNCATION
from sed_megatron.loss.fused_linear import SCHEMES as FUSED_MODES
from sed_megatron.loss.tau import PUBLISHED_TOP_K, TOKEN_SETS, calibration_top_k
from sed_megatron.world import ConfigError, flags_to_argv, option_actions, value_to_argv

MEGATRON_SECTIONS = ("model", "parallel", "training", "optimizer", "checkpoint", "logging")

TAU_CALIBRATION_FLAGS = {  # LossConfig-adjacent settings of tau calibration -> flag (YAML loss: keys)
    "calibrate_ratio": "--sed-calibrate-ratio",
    "calibrate_samples": "--sed-calibrate-samples",
    "calibrate_tokens": "--sed-calibrate-tokens",
    "calibrate_top_k": "--sed-calibrate-top-k",
}
FUSED_FLAGS = {  # the fused output-layer loss (YAML loss: keys) -> flag
    "fused_linear": "--sft-fused-linear",
    "fused_mode": "--sft-fused-mode",
    "fused_chunk_tokens": "--sft-fused-chunk-tokens",
}
DATA_FLAGS = {  # YAML data: key -> flag
    "kind": "--sft-data-kind",
    "path": "--sft-data-path",
    "tokenizer": "--sft-tokenizer",
    "schema": "--sft-data-schema",
    "reasoning": "--sft-data-reasoning",
    "truncation": "--sft-data-truncation",
    "cache_dir": "--sft-data-cache-dir",
    "prompt_key": "--sft-prompt-key",
    "response_key": "--sft-response-key",
    "num_samples": "--sft-num-samples",
    "prompt_length": "--sft-prompt-length",
    "seed": "--sft-data-seed",
    "valid_fraction": "--sft-valid-fraction",
    "pack": "--sft-pack",
}
LORA_FLAGS = {  # LoRAConfig field (YAML lora: keys) -> flag
    "rank": "--lora-rank",
    "alpha": "--lora-alpha",
    "dropout": "--lora-dropout",
    "target_modules": "--lora-target-modules",
    "use_rslora": "--lora-rslora",
}
RUN_FLAGS = {  # run-level keys at the top of the YAML -> flag
    "log_entropy": "--log-entropy",
    "metrics_file": "--metrics-file",
    "resume": "--resume",
    "hang_timeout_minutes": "--hang-timeout-minutes",
}
CHECKPOINT_FLAGS = {  # YAML checkpoint: keys of sed_megatron's own (the section's others are Megatron's) -> flag
    "keep_last": "--save-keep-last",
    "load_fallback": "--load-fallback",
}
LOSS_MODULE_FLAG = "--loss-module"
OWN_SECTIONS = {"loss": lambda: loss_flags(), "data": lambda: DATA_FLAGS, "lora": lambda: LORA_FLAGS}
"""YAML sections of sed_megatron's own settings -> their key -> flag tables."""


def loss_flags():
    """YAML `loss:` key -> flag: the LossConfig fields (the registered kinds' parameters included),
    tau calibration, the fused loss, and `module` (a kind of one's own)."""
    from sed_megatron.loss.kinds import declared_params

    return {"kind": "--loss-type", "top_k": "--sed-top-k", **{name: param.flag for name, param in declared_params().items()},
            **TAU_CALIBRATION_FLAGS, **FUSED_FLAGS, "module": LOSS_MODULE_FLAG}


def _dest(flag):
    return flag[2:].replace("-", "_")


def _own_keys():
    return {_dest(flag) for table in (loss_flags(), DATA_FLAGS, LORA_FLAGS, RUN_FLAGS, CHECKPOINT_FLAGS)
            for flag in table.values()} | {
        "config", "verbose", "help_megatron"}


def import_loss_modules(argv):
    """Import the modules that --loss-module (YAML loss.module) names, before any parser exists:
    each registers a loss kind of one's own, whose flags the parser then has. ConfigError (one
    line naming the flag or key) when one does not import."""
    import importlib

    names = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == LOSS_MODULE_FLAG]
    names += [arg.split("=", 1)[1] for arg in argv if arg.startswith(LOSS_MODULE_FLAG + "=")]
    path = config_path_from_argv(argv)
    where = {name: LOSS_MODULE_FLAG for name in names}
    if path is not None:
        try:
            doc, _ = load_config(path)
        except ConfigError:
            doc = {}  # reported, with its file and line, by the YAML reader
        listed = doc.get("loss", {}).get("module") if isinstance(doc.get("loss"), dict) else None
        for name in [listed] if isinstance(listed, str) else (listed or []):
            where.setdefault(name, f"{path}: loss.module")
            names.append(name)
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure to import is the user's to see, in one line
            raise ConfigError(f"{where[name]} {name}: cannot import it ({type(err).__name__}: "
                              f"{(str(err).splitlines() or [''])[0]})") from None


def add_sed_arguments(parser):
    """The SED-SFT argument group (Megatron's extra_args_provider)."""
    group = parser.add_argument_group("sed-sft")
    group.add_argument("--config", default=None, help="YAML run configuration (flags on the command line win)")
    group.add_argument("--verbose", action="store_true",
                       help="also print Megatron-LM's argument dump and its notices about optional kernels")
    group.add_argument("--help-megatron", action="store_true", help="list every Megatron-LM flag (about 900) and exit")
    add_loss_arguments(group)
    group.add_argument("--sed-calibrate-ratio", type=float, default=None,
                       help="calibrate tau before the first step as the (1 - r) quantile of the initial "
                            "model's top-k mass, r = this masking ratio (--sed-tau, if given, wins)")
    group.add_argument("--sed-calibrate-samples", type=int, default=100, help="validation samples for it")
    group.add_argument("--sed-calibrate-tokens", default="response", choices=TOKEN_SETS,
                       help="tokens whose top-k mass sets tau: response (the loss tokens), all (every position "
                            "with a target), or published (the published calibration: every position of the input, "
                            "k = 10 unless --sed-calibrate-top-k is given; docs/CALIBRATION.md)")
    group.add_argument("--sed-calibrate-top-k", type=int, default=None,
                       help="k of the top-k mass that calibrates tau (default: --sed-top-k, the k of training; "
                            f"{PUBLISHED_TOP_K} with --sed-calibrate-tokens published)")
    group.add_argument("--sft-fused-linear", action="store_true",
                       help="the output layer and the loss chunk by chunk of tokens: no [tokens, V/tp] logits "
                            "(fused_linear_sft_loss; the same loss, tau calibration included)")
    group.add_argument("--sft-fused-mode", default=None, choices=list(FUSED_MODES),
                       help="its gradient scheme: grad-in-forward (3 GEMMs, the default) or recompute (4 GEMMs, "
                            "the least memory)")
    group.add_argument("--sft-fused-chunk-tokens", type=int, default=None,
                       help="tokens per chunk of --sft-fused-linear (default: about 2^27 logits per chunk on a "
                            "GPU with grad-in-forward, 2^26 with recompute, 2^24 on CPU)")
    group.add_argument("--sft-data-kind", default="synthetic", choices=["synthetic", "indexed", "chat", "jsonl"],
                       help="synthetic: a seeded memorization set; indexed: the prefix written by "
                            "tools/preprocess_sft_data.py; chat: SFT data as preprocess_sft_data.py reads it "
                            "(JSONL, parquet, shards, saved datasets, hf:NAME), tokenized once into a cache; jsonl: "
                            "pre-tokenized {tokens, loss_mask} lines")
    group.add_argument("--sft-data-path", default=None,
                       help="the indexed dataset prefix, the chat data (preprocess_sft_data.py's --input), or the "
                            "JSONL file")
    group.add_argument("--sft-tokenizer", default=None, metavar="HF_DIR",
                       help="chat: the tokenizer (default: a Hugging Face --load, or --save-hf-template)")
    group.add_argument("--sft-data-schema", default="auto", choices=SCHEMAS, help="chat: the rows' schema")
    group.add_argument("--sft-data-reasoning", default=DEFAULT_REASONING, choices=REASONING_MODES,
                       help="chat: thinking as <think> text, reasoning_content or dropped")
    group.add_argument("--sft-prompt-key", default="prompt", metavar="KEY",
                       help="chat: the prompt field of prompt/response rows")
    group.add_argument("--sft-response-key", default="response", metavar="KEY",
                       help="chat: the response field of prompt/response rows")
    group.add_argument("--sft-data-truncation", default="error", choices=TRUNCATION,
                       help="chat: samples longer than --seq-length + 1 tokens stop the run, are skipped or cut")
    group.add_argument("--sft-data-cache-dir", default=None, metavar="DIR",
                       help="chat: where the tokenized data is kept (default: <save>/data_cache)")
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
    add_lora_arguments(group)
    group.add_argument("--log-entropy", action="store_true",
                       help="report the entropy of the predicted distribution (one more pass in the loss)")
    group.add_argument("--inject-non-finite", default=None, metavar="ITERATION:loss|grad",
                       help="testing: make the loss (or only its gradients) NaN at that iteration, to see the run "
                            "stop before the optimizer step")
    group.add_argument("--inject-save-error", default=None, metavar="ITERATION:ENOSPC",
                       help="testing: the save of that iteration fails in its write with that OSError (ENOSPC: a "
                            "full disk; EIO, EDQUOT), after the first item of a file")
    group.add_argument("--load-fallback", action="store_true",
                       help="when the checkpoint --load names is not whole (a shard or its metadata missing or cut "
                            "short), load the newest older complete one of that directory instead, said in the log "
                            "(YAML checkpoint.load_fallback; without it the run stops in one line naming the file)")
    group.add_argument("--save-keep-last", type=int, default=None, metavar="N",
                       help="once a save is complete, delete the checkpoints in --save beyond the N newest complete "
                            "ones (never the one the tracker names, nor one being written; YAML checkpoint.keep_last)")
    group.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                       help="continue from the newest checkpoint in --save when there is one (default)")
    group.add_argument("--hang-timeout-minutes", type=float, default=10.0,
                       help="a rank without progress this long ends the job (exit 6); 0: off")
    group.add_argument("--inject-fault", action="append", default=[], metavar="SPEC",
                       help="testing: ITERATION:kill|stop|raise[:RANK[:ATTEMPT]] (docs/TRAINING.md)")
    group.add_argument("--save-hf", default=None, metavar="DIR",
                       help="at the end, the Hugging Face export of the newest checkpoint in --save (YAML "
                            "checkpoint.save_hf); --load may be a Hugging Face model directory itself: it is "
                            "converted once into <save>/hf_converted (or --hf-cache-dir) and reused")
    group.add_argument("--save-hf-every-save", action="store_true",
                       help="--save-hf after every checkpoint too (YAML checkpoint.save_hf_every_save), exported in a "
                            "process of its own while training goes on")
    group.add_argument("--save-hf-template", default=None, metavar="HF_DIR",
                       help="tokenizer, chat template and generation files for --save-hf (default: a Hugging "
                            "Face --load)")
    group.add_argument("--hf-cache-dir", default=None, help="where a Hugging Face --load is converted to")
    group.add_argument("--metrics-file", default=None,
                       help="JSON-lines metrics (default: metrics.jsonl in --save, else in the working directory)")
    return parser


def add_lora_arguments(group):
    """LoRA (sed_megatron/lora): rank 0 (the default) is full fine-tuning."""
    from sed_megatron.lora import ALL_LINEAR

    group.add_argument("--lora-rank", type=int, default=0,
                       help="train low-rank adapters of this rank on a frozen base (with --load BASE --finetune); "
                            "0: full fine-tuning")
    group.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling alpha / rank (default: the rank)")
    group.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (default 0)")
    group.add_argument("--lora-target-modules", default=None,
                       help=f"projections to adapt, by PEFT's names: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                            f"down_proj or {ALL_LINEAR} (the default)")
    group.add_argument("--lora-rslora", action="store_true", default=None,
                       help="rank-stabilized scaling alpha / sqrt(rank)")


def lora_config_from_args(args):
    """The LoRAConfig of the parsed arguments, or None (rank 0: full fine-tuning). ValueError naming
    the flag: a LoRA setting without a rank, or a bad value."""
    from sed_megatron.lora import ALL_LINEAR, LoRAConfig

    rank = args.lora_rank
    given = [flag for field, flag in LORA_FLAGS.items() if field != "rank" and getattr(args, _dest(flag)) is not None]
    if not rank:
        if given:
            raise ValueError(f"{given[0]} (lora.{_field_of(given[0])}) is given but --lora-rank (lora.rank) is 0 "
                             f"or absent: set a rank, or drop the LoRA settings for full fine-tuning")
        return None
    try:
        return LoRAConfig(rank=rank, alpha=args.lora_alpha if args.lora_alpha is not None else float(rank),
                          dropout=args.lora_dropout or 0.0, target_modules=args.lora_target_modules or ALL_LINEAR,
                          use_rslora=bool(args.lora_rslora), init_seed=args.seed)
    except ValueError as err:
        message = str(err)
        for field, flag in LORA_FLAGS.items():
            message = message.replace(f"LoRAConfig.{field}:", f"{flag} (lora.{field}):")
        if message.startswith("unknown target module"):
            message = f"--lora-target-modules (lora.target_modules): {message}"
        raise ValueError(message) from None


def _field_of(flag):
    return next(field for field, f in LORA_FLAGS.items() if f == flag)


def add_loss_arguments(group):
    """The loss flags: the kind, top_k, and every registered kind's parameters (`LossKind.params`)."""
    from sed_megatron.loss.config import COMMON_FIELDS
    from sed_megatron.loss.kinds import declared_params, kind_names

    group.add_argument(LOSS_MODULE_FLAG, action="append", default=[], metavar="MODULE",
                       help="import MODULE first: a loss kind of one's own (sed_megatron.loss.register)")
    group.add_argument("--loss-type", default=COMMON_FIELDS["kind"], choices=kind_names(), help="token loss")
    group.add_argument("--sed-top-k", type=int, default=2,
                       help="k of the top-k mass every kind reports (and SED's mask reads; paper: 2)")
    for param in declared_params().values():
        group.add_argument(param.flag, type=param.type, default=param.default, choices=param.choices,
                           help=param.help)


def yaml_flags_to_argv(flags, parser, where, sources=None, actions=None):
    """Command-line arguments for a mapping of Megatron-LM flags (YAML keys); SED-SFT's own keys
    belong to their sections and are refused here (sources, actions: as in world.flags_to_argv)."""
    return flags_to_argv(flags, parser, where, sources, reserved=_own_keys(), actions=actions)


INCLUDE_KEY = "include"
"""A top-level YAML key: the file(s), relative to this one, whose settings this one extends."""


def _read_yaml(path):
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
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return doc


def load_config(path, _chain=()):
    """(settings, origin) of the YAML at `path` with the files it includes merged beneath it.

    `include: base.yaml` (or a list, each relative to this file) takes a base's sections first,
    then this file's: a key given here wins, section by section (a recipe is its model's base
    plus what its loss changes). origin maps (section, key) -- or (section, None) for a
    top-level value -- to the file that set it, so errors and sources name the right file."""
    doc = _read_yaml(path)
    includes = doc.pop(INCLUDE_KEY, None)
    includes = [includes] if isinstance(includes, str) else includes or []
    if not isinstance(includes, list) or not all(isinstance(name, str) for name in includes):
        raise ConfigError(f"{path}: {INCLUDE_KEY}: expected a file name or a list of them, got {includes!r}")
    merged, origin = {}, {}
    for name in includes:
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), name))
        if base_path in _chain + (os.path.normpath(path),):
            raise ConfigError(f"{path}: {INCLUDE_KEY}: {name} includes {path} again (a cycle)")
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: {INCLUDE_KEY}: {name}: no such file (relative to {path})")
        _merge(merged, origin, *load_config(base_path, _chain + (os.path.normpath(path),)))
    own = {(section, key): path for section, body in doc.items()
           for key in (body if isinstance(body, dict) else [None])}
    _merge(merged, origin, doc, own)
    return merged, origin


def _merge(merged, origin, doc, doc_origin):
    for section, body in doc.items():
        if isinstance(body, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **body}
        else:
            merged[section] = dict(body) if isinstance(body, dict) else body
            for key in [k for k in origin if k[0] == section]:
                del origin[key]
        origin.update({key: file for key, file in doc_origin.items() if key[0] == section})


def yaml_to_argv(path, parser, sources=None):
    """The command-line arguments equivalent to the YAML file at `path` and its includes (sources: as above)."""
    doc, origin = load_config(path)
    actions = option_actions(parser)
    argv = []
    for section, body in doc.items():
        section_file = origin.get((section, None)) or next((f for (s, _), f in origin.items() if s == section), path)
        if section in RUN_FLAGS:
            option, action = actions[RUN_FLAGS[section][2:].replace("-", "_")]
            argv += value_to_argv(option, action, body, f"{section_file}: {section}")
            if sources is not None:
                sources[action.dest] = f"{section_file}: {section}"
            continue
        if section not in MEGATRON_SECTIONS + tuple(OWN_SECTIONS):
            known = ", ".join(MEGATRON_SECTIONS + tuple(OWN_SECTIONS) + tuple(RUN_FLAGS) + (INCLUDE_KEY,))
            raise ConfigError(f"{section_file}: unknown section {section!r} (known: {known})")
        if not isinstance(body, dict):
            raise ConfigError(f"{section_file}: section {section!r} must be a mapping")
        for key, value in body.items():
            file = origin.get((section, key), path)
            where = f"{file}: {section}.{key}"
            if section in OWN_SECTIONS:
                table = OWN_SECTIONS[section]()
                if key not in table:
                    raise ConfigError(f"{where}: unknown key (known: {', '.join(table)})")
                option, action = actions[table[key][2:].replace("-", "_")]
                if section == "lora" and key == "target_modules" and isinstance(value, list):
                    value = ",".join(map(str, value))  # PEFT's list form
                argv += value_to_argv(option, action, value, where)
                if sources is not None:
                    sources[action.dest] = where
                continue
            if section == "checkpoint" and key in CHECKPOINT_FLAGS:
                option, action = actions[_dest(CHECKPOINT_FLAGS[key])]
                argv += value_to_argv(option, action, value, where)
                if sources is not None:
                    sources[action.dest] = where
                continue
            argv += yaml_flags_to_argv({key: value}, parser, f"{file}: {section}", sources, actions)
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
        actions = option_actions(parser)
        for arg in argv:
            if arg.startswith("--") and arg[2:].split("=")[0].replace("-", "_") in actions:
                sources.pop(actions[arg[2:].split("=")[0].replace("-", "_")][1].dest, None)
    return yaml_argv + list(argv)



def loss_fields(args):
    """The LossConfig fields of the parsed arguments, as a dict (the registered kinds' parameters by their flags)."""
    from sed_megatron.loss.kinds import declared_params

    return {"kind": args.loss_type, "top_k": args.sed_top_k,
            **{name: getattr(args, _dest(param.flag)) for name, param in declared_params().items()}}


def calibrates_tau(args):
    """Whether tau comes from calibration before the first step: asked for (--sed-calibrate-ratio),
    read by the kind (`LossKind.uses_tau`), and not given (an explicit tau wins)."""
    from sed_megatron.loss import LossConfig, get_kind

    fields = loss_fields(args)
    if args.sed_calibrate_ratio is None or fields.get("tau") is not None:
        return False
    probe = LossConfig(**{**fields, "tau": 1.0})  # the placeholder loss_config_from_args uses
    return get_kind(probe.kind).uses_tau(probe)


def calibration_top_k_from_args(args):
    """k of the calibration: --sed-calibrate-top-k, else 10 (published tokens) or --sed-top-k."""
    return calibration_top_k(args.sed_calibrate_tokens, args.sed_top_k, args.sed_calibrate_top_k)


def loss_config_from_args(args):
    """The LossConfig of the parsed arguments (read once; library code never sees args).

    With --sed-calibrate-ratio (and no --sed-tau, which wins), tau is left at 1.0 here and set
    by the calibration that runs before the first step.
    """
    from sed_megatron.loss import LossConfig

    fields = loss_fields(args)
    if args.sed_calibrate_top_k is not None and args.sed_calibrate_top_k < 1:
        raise ValueError(f"LossConfig.calibrate_top_k: must be an integer >= 1, got {args.sed_calibrate_top_k}")
    if calibrates_tau(args):
        if not 0.0 <= args.sed_calibrate_ratio <= 1.0:
            raise ValueError(f"LossConfig.calibrate_ratio: must lie in [0, 1], got {args.sed_calibrate_ratio}")
        fields["tau"] = 1.0
    return LossConfig(**fields)


def write_config_with_tau(source, target, tau):
    """The YAML at source (its includes merged in, so the copy stands alone wherever it is written)
    with loss.tau set, written to target (whole or not at all)."""
    from sed_megatron.utils import atomic_write_text

    config, _ = load_config(source)
    config.setdefault("loss", {})["tau"] = tau
    atomic_write_text(target, yaml.safe_dump(config, sort_keys=False))
