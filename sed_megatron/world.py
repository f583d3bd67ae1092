"""The Megatron process world that a training run, a converter and a comparison each stand in.

    single_process_env()                                     # a world of one process, unless torchrun made one
    args = megatron_args(flags, runtime, prog)               # Megatron-LM's validated args for those flags
    model = model_provider(args)                             # the GPTModel of a stage (Megatron's contract)

Megatron-LM keeps its settings in a global argparse Namespace that its checkpoint functions and
initialization read. megatron_args makes it from Megatron flags alone: the runtime's defaults
(CPU flags, the layer implementation, never a silent fallback), a converted checkpoint's
architecture (the model file in --load), the flags given, the fusions whose kernels are missing
switched off, checks of the caller's (training's start-up checks), then Megatron's own
validation; every failure is one line and exit 2. The training parser (YAML, SED-SFT's flags,
its start-up checks: training/parse.py) is built on it; the converters use it directly.
"""

import argparse
import contextlib
import os
import sys

from sed_megatron.utils import ONE_PROCESS_WORLD, UsageError
from sed_megatron.utils import fail as _fail


class ConfigError(ValueError):
    """A bad configuration file or value; the message names the file and key."""


def fail(message, prog="sed_megatron.train"):
    _fail(message, prog)


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
    settings are argv; one line and exit 2 when it asked for Transformer Engine and cannot have
    it (runtime.layer_implementation)."""
    from sed_megatron.runtime import LayerImplementationError, layer_implementation, requested_transformer_impl

    requested = requested_transformer_impl(argv)
    try:
        impl, notice = layer_implementation(requested, runtime)
    except LayerImplementationError as err:
        fail(str(err), prog)
    return (None if requested else impl), notice


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


def option_names(parser):
    """{dest: its long option}, for messages that name a setting."""
    return {action.dest: option for option, action in option_actions(parser).values()}


def option_actions(parser):
    """'flag_name' (dashes as underscores) -> argparse action, for every long option."""
    actions = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                actions[option[2:].replace("-", "_")] = (option, action)
    return actions


def value_to_argv(option, action, value, where):
    if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x: true or false
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {option} is a switch; expected true or false, got {value!r}")
        return [option if value else f"--no-{option[2:]}"]
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


def flags_to_argv(flags, parser, where, sources=None, reserved=(), actions=None):
    """Command-line arguments for a mapping of Megatron-LM flags (YAML keys: a flag's name with "_"
    for "-"); ConfigError naming `where` and the key for a flag the parser lacks or a `reserved` one.

    sources, if given, records where each setting came from: {dest: "where.key"}.
    actions: option_actions(parser), when the caller has it (it takes a millisecond a call)."""
    actions = option_actions(parser) if actions is None else actions
    argv = []
    for key, value in flags.items():
        if key not in actions or key in reserved:
            raise ConfigError(f"{where}.{key}: unknown Megatron-LM flag --{key.replace('_', '-')}")
        argv += value_to_argv(*actions[key], value, f"{where}.{key}")
        if sources is not None:
            sources[actions[key][1].dest] = f"{where}.{key}"
    return argv


def megatron_parser(prog, add_arguments=None):
    """Megatron-LM's parser (and the options add_arguments adds), its errors one line."""
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(OneLineErrorParser(prog=prog, allow_abbrev=False))
    if add_arguments is not None:
        parser = add_arguments(parser)
    _escape_bare_percent(parser)
    return parser


def megatron_args(argv, runtime, prog, add_arguments=None, sources=None, checks=None, verbose=False, parser=None):
    """Megatron-LM's validated args (set as its global args) for a run of the flags argv.

    add_arguments(parser): the caller's options (Megatron's extra_args_provider). sources:
    {dest: where a setting came from} for messages. checks(namespace, options, sources) -> (notices,
    extra flags) sees the parsed flags before Megatron validates them (and may end the run with
    one line). verbose=False hides Megatron's argument dump."""
    from megatron.training.arguments import parse_and_validate_args

    from sed_megatron.models.model_file import MODEL_FILE, read_model_file
    from sed_megatron.runtime import missing_kernel_flags

    # Megatron requires it with tensor parallelism (kernel ordering on one CUDA stream queue).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    rank_zero = os.environ.get("RANK", "0") == "0"
    parser = parser or megatron_parser(prog, add_arguments)
    if not verbose:
        import megatron.training.arguments as megatron_arguments

        megatron_arguments._print_args = lambda *args, **kwargs: None  # the ~900-line argument dump
    try:
        # A converted checkpoint carries its architecture: its flags come before the others.
        load = parser.parse_known_args(run_defaults(runtime) + list(argv))[0].load
        model_info = read_model_file(load)
        model_sources = {}
        model_argv = ([] if model_info is None else
                      flags_to_argv(model_info["model"], parser, f"{os.path.join(load, MODEL_FILE)}: model",
                                    model_sources))
        sources = {**model_sources, **(sources or {})}
    except (ConfigError, ValueError) as err:
        fail(str(err), prog)
    impl, layers_notice = choose_layers(model_argv + list(argv), runtime, prog)
    full_argv = run_defaults(runtime, impl) + model_argv + list(argv)
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
    notices, extra = checks(namespace, option_names(parser), sources) if checks is not None else ([], [])
    if model_info is not None and model_info["padded_vocab_size"] % namespace.tensor_model_parallel_size:
        fail(f"{MODEL_FILE}: padded vocabulary {model_info['padded_vocab_size']} does not split over "
             f"TP={namespace.tensor_model_parallel_size}", prog)
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
    return args


def _assertion_text(err):
    """An assertion's message, or its source line and place when it has none."""
    import linecache
    import traceback

    if str(err):
        return str(err).strip().splitlines()[0]
    frame = traceback.extract_tb(err.__traceback__)[-1]
    line = linecache.getline(frame.filename, frame.lineno).strip()
    return f"{line} ({'/'.join(frame.filename.split('/')[-3:])}:{frame.lineno})"


def single_process_env():
    """A torch.distributed world of one process for the converters, unless torchrun set one up."""
    if "RANK" not in os.environ:  # port 0: its store binds a port the system picks (no one else connects)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    elif os.environ.get("WORLD_SIZE", "1") != "1":
        raise UsageError("run the converter as a single process (no torchrun with several processes)")


@contextlib.contextmanager
def single_process_model_parallel():
    """A gloo world of this one process with Megatron's model parallel state at TP=PP=1, torn
    down on exit: enough to build a GPTModel and read its sharded state dict."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise UsageError("run the converter as a single process (no torchrun with several processes)")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=ONE_PROCESS_WORLD, rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def model_config_from_args(args):
    """The typed ModelConfig of Megatron's validated args: the model code never reads the Namespace.

    The Hugging Face model_type (which picks the family's layers) comes from the model file of a
    converted checkpoint in --load; a model defined by flags alone has none."""
    from sed_megatron.models import ModelConfig
    from sed_megatron.models.model_file import read_model_file

    info = read_model_file(args.load)
    return ModelConfig.from_megatron_args(args, model_type=None if info is None else info["model_type"])


def model_provider(args, pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None,
                   lora=None, lora_base=None):
    """Megatron's model_provider: the GPTModel of one pipeline stage, from the typed ModelConfig.

    lora: a LoRAConfig: adapters on it, the rest frozen. lora_base None: the checkpoint Megatron
    loads next is the base (the model's checkpoint holds the base only until
    sed_megatron.lora.set_checkpoint_parts); else the base checkpoint to read the base weights
    from here, Megatron then loading the adapters (the model's checkpoint holds them only)."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from sed_megatron.models import build_gpt_model

    config = config or core_transformer_config_from_args(args)
    model = build_gpt_model(model_config_from_args(args), config, pre_process, post_process, vp_stage, pg_collection)
    if lora is not None:
        from sed_megatron.lora import apply_lora

        apply_lora(model, lora, checkpoint="base" if lora_base is None else "adapters")
        if lora_base is not None:
            from sed_megatron.lora.checkpoint import load_base

            load_base(model, lora_base)
    return model
