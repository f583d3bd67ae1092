"""Flags and YAML to Megatron-LM's validated args: the one place a run's Namespace is made.

    args, loss_cfg = parse_run_args(argv, runtime)     # defaults, model file, YAML, command line, checks

What a runtime implies (CPU flags, the layer implementation), a converted checkpoint's
architecture, the YAML (with its includes) and the command line, in that order, the last
winning; then sed_megatron's start-up checks (validate.py) and Megatron's own validation.
Every bad input ends as one line and exit 2. Help (-h: the tool's and SED-SFT's options,
--help-megatron: Megatron-LM's too) is printed here.
"""

import argparse
import os
import sys

from sed_megatron.world import choose_layers, fail, megatron_args, megatron_parser, run_defaults

from .datasets import packs_thd  # light: parse stays quick to import for --help


def load_loss_modules(argv, prog="sed_megatron.train"):
    """The loss kinds of one's own that --loss-module (YAML loss.module) names, registered before any
    parser is built (their parameters are flags); one line and exit 2 when one does not import."""
    from .arguments import ConfigError, import_loss_modules

    try:
        import_loss_modules(argv)
    except ConfigError as err:
        fail(str(err), prog)


def print_help_if_asked(argv, prog, description=None, extra_args_provider=None):
    """-h/--help: the tool's own options, then SED-SFT's (Megatron-LM's ~900 flags are behind
    --help-megatron); exit 0. Entry points call it before anything else.

    A tool (extra_args_provider) shows its own options on the first screen: its usage names
    only them, and its docstring's notes come after the options (utils.help_sections)."""
    if "-h" not in argv and "--help" not in argv:
        return
    load_loss_modules(argv, prog)
    from sed_megatron.utils import help_sections

    from .arguments import add_sed_arguments

    megatron = "Every Megatron-LM flag (parallelism, precision, checkpoints, logging, ...) is accepted too: " \
               "--help-megatron lists them."
    sections = {"description": description, "epilog": megatron}
    usage = None
    if extra_args_provider is not None:
        sections = help_sections(description or "")
        sections["epilog"] = "\n\n".join(filter(None, [sections["epilog"], megatron]))
        own = extra_args_provider(argparse.ArgumentParser(prog=prog)).format_usage().strip()[len("usage: "):]
        usage = f"{own}\n{' ' * (len(prog) + 8)}[SED-SFT options] [Megatron-LM options]"
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, usage=usage, **sections,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    add_sed_arguments(parser).print_help()
    sys.exit(0)


def parse_flags(argv, runtime, extra_args_provider=None, prog="sed_megatron.train"):
    """The flags of a run (defaults, YAML, command line) as an argparse namespace, without
    Megatron's validation or global state: enough to know the layout before processes start."""
    from .arguments import ConfigError, add_sed_arguments, expand_config

    load_loss_modules(argv, prog)
    parser = megatron_parser(prog, lambda p: add_sed_arguments(extra_args_provider(p) if extra_args_provider else p))
    try:
        expanded = expand_config(argv, parser)
    except (ConfigError, ValueError) as err:
        fail(str(err), prog)
    impl, _ = choose_layers(expanded, runtime, prog)
    return parser.parse_known_args(run_defaults(runtime, impl) + expanded)[0]


def check_before_spawn(argv, runtime, world_size, **parse_kwargs):
    """parse_run_args for a world of world_size ranks, in the process that is about to start them:
    bad input ends here as one line (not once per rank), before any rank exists."""
    from sed_megatron.utils import quiet_stdout

    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        with quiet_stdout():  # notices are printed by rank 0 of the world
            parse_run_args(argv, runtime, **parse_kwargs)
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved


def parse_run_args(argv, runtime, need_loss_config=True, extra_args_provider=None, precheck=None,
                   prog="sed_megatron.train", description=None):
    """(Megatron's validated args, LossConfig or None) from defaults + YAML + command line.

    The YAML (with its includes) and SED-SFT's flags on top of world.megatron_args, with
    sed_megatron's start-up checks (validate.py) before Megatron's. precheck(namespace), if
    given, sees the parsed flags before they are validated, so a tool's own bad input is
    reported first. -h/--help prints the tool's and SED-SFT's options (with `description` above
    them) and exits; --help-megatron prints Megatron-LM's too.
    """
    from .arguments import ConfigError, add_sed_arguments, expand_config
    from .validate import Settings, StartupError, validate_run

    def add_arguments(parser):  # a tool's own options first, then SED-SFT's
        parser = extra_args_provider(parser) if extra_args_provider else parser
        return add_sed_arguments(parser)

    print_help_if_asked(argv, prog, description, extra_args_provider)
    load_loss_modules(argv, prog)
    parser = megatron_parser(prog, add_arguments)
    if "--help-megatron" in argv:
        parser.print_help()
        sys.exit(0)
    sources = {}  # where each setting came from, for the error messages
    try:
        expanded = expand_config(argv, parser, sources)
    except (ConfigError, ValueError) as err:
        fail(str(err), prog)
    loss = []

    def checks(namespace, options, all_sources):  # ours first, before Megatron's
        loss.append(loss_config(namespace, prog) if need_loss_config else None)
        check_data_args(namespace, prog)
        check_lora_args(namespace, prog)
        if namespace.save_hf and not namespace.save:
            fail("--save-hf exports the newest checkpoint in --save: give --save too", prog)
        unattended = check_unattended_args(namespace, expanded, prog)
        if precheck is not None:
            precheck(namespace)
        try:
            # need_loss_config: a training run; the tools that take none run the model forward only
            notices, extra = validate_run(Settings(namespace, options, all_sources),
                                          int(os.environ.get("WORLD_SIZE", "1")), training=need_loss_config)
        except StartupError as err:
            fail(str(err), prog)
        return notices, [*extra, *unattended]

    args = megatron_args(expanded, runtime, prog, add_arguments, sources, checks, verbose="--verbose" in argv,
                         parser=parser)
    if hasattr(args, "resume"):  # Megatron parsed the flags again: what a resume turns off, off in its args too
        from .resume import adjust_for_resume

        adjust_for_resume(args)
    return args, loss[0]


def check_unattended_args(args, expanded, prog="sed_megatron.train"):
    """Resume (training/resume.py), the hang timeout and --distributed-timeout-minutes (one minute
    past it unless given: the watchdog names the rank before a collective times out), --inject-fault.
    Returns the flags to add for Megatron's own parse (the collectives' timeout)."""
    import math

    from .faults import Fault
    from .resume import adjust_for_resume

    if not hasattr(args, "hang_timeout_minutes"):  # a tool without the training flags
        return []
    adjust_for_resume(args)
    if not args.hang_timeout_minutes >= 0:
        fail(f"--hang-timeout-minutes {args.hang_timeout_minutes:g}: must be >= 0 (0: no hang detection)", prog)
    given = any(a == "--distributed-timeout-minutes" or a.startswith("--distributed-timeout-minutes=")
                for a in expanded)
    extra = []
    if args.hang_timeout_minutes > 0 and not given:
        args.distributed_timeout_minutes = math.ceil(args.hang_timeout_minutes) + 1
        extra = ["--distributed-timeout-minutes", str(args.distributed_timeout_minutes)]
    for text in args.inject_fault:
        try:
            Fault.parse(text)
        except ValueError as err:
            fail(str(err), prog)
    return extra


def check_data_args(args, prog="sed_megatron.train"):
    """Data settings that cannot work together, reported before anything starts."""
    if args.sft_data_kind in ("indexed", "jsonl") and not args.sft_data_path:
        fail(f"--sft-data-kind {args.sft_data_kind} needs --sft-data-path (YAML data.path)", prog)
    if args.sft_data_kind == "chat":  # sed_megatron.train turns it into an indexed dataset first
        fail(f"--sft-data-kind chat is tokenized by sed_megatron.train; for {prog}, tokenize it first "
             "(tools/preprocess_sft_data.py) and give --sft-data-kind indexed", prog)
    if args.sft_pack:
        if args.sft_data_kind != "indexed":
            fail("--sft-pack needs --sft-data-kind indexed", prog)
        if not packs_thd(args) and not args.create_attention_mask_in_dataloader:
            fail("--sft-pack with --transformer-impl local needs the data loader's attention mask "
                 "(drop --no-create-attention-mask-in-dataloader)", prog)


def check_lora_args(args, prog="sed_megatron.train"):
    """LoRA settings (one line naming the flag): a valid LoRAConfig, and a base to adapt."""
    from .arguments import lora_config_from_args

    try:
        cfg = lora_config_from_args(args)
    except ValueError as err:
        fail(str(err), prog)
    if cfg is None:
        return
    if not args.load:
        fail("--lora-rank trains adapters on a base model: give its checkpoint with --load CKPT --finetune "
             "(tools/convert_hf_to_mcore.py makes one)", prog)
    from sed_megatron.lora import LORA_FILE, read_lora_file

    try:
        stored = read_lora_file(args.load)
    except ValueError as err:
        fail(str(err), prog)
    if stored is None:
        return
    for field, flag in (("rank", "--lora-rank"), ("target_modules", "--lora-target-modules")):
        if getattr(stored[0], field) != getattr(cfg, field):
            fail(f"{flag} {getattr(cfg, field)!r} differs from the adapters in {args.load} "
                 f"({LORA_FILE}: {field} {getattr(stored[0], field)!r})", prog)
    from sed_megatron.lora.checkpoint import base_checkpoint_dir
    from sed_megatron.utils import UsageError

    try:
        base_checkpoint_dir(args.load, stored[1])
    except UsageError as err:
        fail(str(err), prog)


def loss_config(args, prog="sed_megatron.train"):
    from .arguments import loss_config_from_args, loss_flags

    try:
        return loss_config_from_args(args)
    except ValueError as err:
        message = str(err)
        for field, flag in loss_flags().items():
            message = message.replace(f"LossConfig.{field}:", f"{flag} (loss.{field}):")
        fail(message, prog)
