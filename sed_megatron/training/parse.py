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

from sed_megatron.utils import fail as _fail

from .datasets import packs_thd


def run_defaults(runtime, transformer_impl=None):
    """Flags that come before the YAML and the command line (so either can override them).

    --rerun-mode disabled: a NaN or Inf loss or gradient stops the run at once, before the
    optimizer step, with one line (nonfinite.py), instead of Megatron's re-run diagnosis, which
    saves, exits with a code for a scheduler and wants the iteration re-run on another GPU.
    transformer_impl: the layer implementation chosen for a run that asked for none."""
    impl = [] if transformer_impl is None else ["--transformer-impl", transformer_impl]
    return ["--calculate-per-token-loss", "--tokenizer-type", "NullTokenizer", "--rerun-mode", "disabled",
            *runtime.megatron_flags(), *impl]


def choose_layers(argv, runtime, prog="sed_megatron.train"):
    """(the implementation to add before the settings or None, a notice or None) for a run whose
    settings (YAML and command line, expanded) are argv; one line and exit 2 when it asked for
    Transformer Engine and cannot have it (runtime.layer_implementation)."""
    from sed_megatron.runtime import LayerImplementationError, layer_implementation, requested_transformer_impl

    requested = requested_transformer_impl(argv)
    try:
        impl, notice = layer_implementation(requested, runtime)
    except LayerImplementationError as err:
        fail(str(err), prog)
    return (None if requested else impl), notice


def fail(message, prog="sed_megatron.train"):
    _fail(message, prog)


def _escape_bare_percent(parser):
    """--help works: argparse %-formats help texts, and some of Megatron-LM's contain a bare '%'."""
    for action in parser._actions:
        if action.help and "%" in action.help:
            try:
                action.help % dict(vars(action), prog=parser.prog)
            except (ValueError, TypeError, KeyError):
                action.help = action.help.replace("%", "%%")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's errors as one line: no usage block (Megatron's parser has ~900 flags)."""

    def error(self, message):
        _fail(message, self.prog)


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
    from megatron.training.arguments import add_megatron_arguments

    from .arguments import ConfigError, add_sed_arguments, expand_config

    load_loss_modules(argv, prog)
    parser = add_megatron_arguments(OneLineErrorParser(prog=prog, allow_abbrev=False))
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    parser = add_sed_arguments(parser)
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

    precheck(namespace), if given, sees the parsed flags before Megatron validates them, so a
    tool's own bad input is reported first. -h/--help prints the tool's and SED-SFT's options
    (with `description` above them) and exits; --help-megatron prints Megatron-LM's too.
    """
    import os

    from megatron.training.arguments import add_megatron_arguments, parse_and_validate_args

    from sed_megatron.runtime import missing_kernel_flags

    # Megatron requires it with tensor parallelism (kernel ordering on one CUDA stream queue).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

    from sed_megatron.models.model_file import MODEL_FILE, read_model_file

    from .arguments import ConfigError, add_sed_arguments, expand_config, option_names, yaml_flags_to_argv
    from .validate import Settings, StartupError, validate_run

    rank_zero = os.environ.get("RANK", "0") == "0"

    def add_arguments(parser):  # a tool's own options first, then SED-SFT's
        parser = extra_args_provider(parser) if extra_args_provider else parser
        return add_sed_arguments(parser)

    print_help_if_asked(argv, prog, description, extra_args_provider)
    load_loss_modules(argv, prog)
    parser = add_arguments(add_megatron_arguments(OneLineErrorParser(prog=prog, allow_abbrev=False)))
    _escape_bare_percent(parser)
    if "--help-megatron" in argv:
        parser.print_help()
        sys.exit(0)
    if "--verbose" not in argv:
        import megatron.training.arguments as megatron_arguments

        megatron_arguments._print_args = lambda *args, **kwargs: None  # the ~900-line argument dump
    sources = {}  # where each setting came from, for the error messages
    try:
        expanded = expand_config(argv, parser, sources)
        # A converted checkpoint carries its architecture: its flags come before the YAML's.
        load = parser.parse_known_args(run_defaults(runtime) + expanded)[0].load
        model_info = read_model_file(load)
        model_sources = {}
        model_argv = ([] if model_info is None else
                      yaml_flags_to_argv(model_info["model"], parser, f"{os.path.join(load, MODEL_FILE)}: model",
                                         model_sources))
        sources = {**model_sources, **sources}
    except (ConfigError, ValueError) as err:
        fail(str(err), prog)
    impl, layers_notice = choose_layers(model_argv + expanded, runtime, prog)
    full_argv = run_defaults(runtime, impl) + model_argv + expanded
    # Our errors first, before Megatron's checks.
    namespace = parser.parse_args(full_argv)
    missing = [flag for flag in missing_kernel_flags(namespace.transformer_impl) if flag not in full_argv]
    if missing:
        full_argv += missing
        namespace = parser.parse_args(full_argv)
        if not runtime.on_cpu and rank_zero:
            print(f"sed_megatron: kernels for these Megatron fusions are not installed (Transformer Engine / apex), "
                  f"so they are off: {' '.join(missing)}", flush=True)
    if layers_notice and rank_zero:
        print(f"sed_megatron: {layers_notice}", flush=True)
    loss_cfg = loss_config(namespace, prog) if need_loss_config else None
    check_data_args(namespace, prog)
    if precheck is not None:
        precheck(namespace)
    if model_info is not None and model_info["padded_vocab_size"] % namespace.tensor_model_parallel_size:
        fail(f"{MODEL_FILE}: padded vocabulary {model_info['padded_vocab_size']} does not split over "
             f"TP={namespace.tensor_model_parallel_size}", prog)
    try:
        # need_loss_config: a training run; the tools that take none run the model forward only
        notices, extra = validate_run(Settings(namespace, option_names(parser), sources),
                                      int(os.environ.get("WORLD_SIZE", "1")), training=need_loss_config)
    except StartupError as err:
        fail(str(err), prog)
    full_argv += extra
    for notice in notices if rank_zero else ():
        print(f"sed_megatron: {notice}", flush=True)
    sys.argv = [sys.argv[0]] + full_argv
    try:
        args = parse_and_validate_args(extra_args_provider=add_arguments)
    except AssertionError as err:
        fail(f"Megatron-LM rejects the settings: {_assertion_text(err)}", prog)
    if model_info is not None:
        args.padded_vocab_size = model_info["padded_vocab_size"]  # the checkpoint's, not the tokenizer's
    return args, loss_cfg


def _assertion_text(err):
    """An assertion's message, or its source line and place when it has none."""
    import linecache
    import traceback

    if str(err):
        return str(err).strip().splitlines()[0]
    frame = traceback.extract_tb(err.__traceback__)[-1]
    line = linecache.getline(frame.filename, frame.lineno).strip()
    return f"{line} ({'/'.join(frame.filename.split('/')[-3:])}:{frame.lineno})"


def check_data_args(args, prog="sed_megatron.train"):
    """Data settings that cannot work together, reported before anything starts."""
    if args.sft_data_kind in ("indexed", "jsonl") and not args.sft_data_path:
        fail(f"--sft-data-kind {args.sft_data_kind} needs --sft-data-path (YAML data.path)", prog)
    if args.sft_pack:
        if args.sft_data_kind != "indexed":
            fail("--sft-pack needs --sft-data-kind indexed", prog)
        if not packs_thd(args) and not args.create_attention_mask_in_dataloader:
            fail("--sft-pack with --transformer-impl local needs the data loader's attention mask "
                 "(drop --no-create-attention-mask-in-dataloader)", prog)


def loss_config(args, prog="sed_megatron.train"):
    from .arguments import loss_config_from_args, loss_flags

    try:
        return loss_config_from_args(args)
    except ValueError as err:
        message = str(err)
        for field, flag in loss_flags().items():
            message = message.replace(f"LossConfig.{field}:", f"{flag} (loss.{field}):")
        fail(message, prog)
