"""What the training entry point and the tools share: argument parsing, datasets, model provider."""

import argparse
import os
import sys

from sed_megatron.utils import fail as _fail


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


def packs_thd(args):
    """Packed rows go through packed-sequence (THD) attention: Transformer Engine's, or under
    context parallelism the local CP attention's (which reads the boundaries like TE). Packed
    rows on the local layers at CP=1 carry a block-diagonal attention mask instead."""
    return args.sft_pack and (args.transformer_impl == "transformer_engine" or args.context_parallel_size > 1)


def loss_config(args, prog="sed_megatron.train"):
    from .arguments import loss_config_from_args, loss_flags

    try:
        return loss_config_from_args(args)
    except ValueError as err:
        message = str(err)
        for field, flag in loss_flags().items():
            message = message.replace(f"LossConfig.{field}:", f"{flag} (loss.{field}):")
        fail(message, prog)


def build_datasets(args, train_val_test_num_samples):
    """(train, valid, test) datasets of already tokenized samples."""
    from sed_megatron.data.packing import PackedSFTDataset
    from sed_megatron.data.sft_preprocess import IndexedSFTDataset, read_indexed_sft, split_indices
    from sed_megatron.data.simple import JsonlSFTDataset, SyntheticSFTDataset

    if args.sft_data_kind == "indexed":
        splits = split_indices(len(read_indexed_sft(args.sft_data_path)[0]), args.sft_valid_fraction,
                               args.sft_data_seed)
    datasets = []
    for split, num_samples in enumerate(train_val_test_num_samples):
        length = max(int(num_samples or 0), 1)
        if args.sft_data_kind == "indexed":
            indices = splits[min(split, 1)] or splits[0]  # test = valid; no valid split: train samples
            dataset = IndexedSFTDataset(args.sft_data_path, indices, length, args.seq_length,
                                        args.sft_data_seed + split)
            if args.sft_pack:  # carries its own mask (local, CP=1) or cu_seqlens (THD)
                datasets.append(PackedSFTDataset(dataset, length, args.seq_length, thd=packs_thd(args),
                                                 cp_size=args.context_parallel_size))
                continue
        elif args.sft_data_kind == "synthetic":
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

    def with_full_input(self):
        """The wrapped dataset's published-calibration view (every id an input), with the mask."""
        import copy

        view = copy.copy(self)
        view.dataset = self.dataset.with_full_input()
        return view


def model_config_from_args(args):
    """The typed ModelConfig of Megatron's validated args: the model code never reads the Namespace.

    The Hugging Face model_type (which picks the family's layers) comes from the model file of a
    converted checkpoint in --load; a model defined by flags alone has none."""
    from sed_megatron.models import ModelConfig
    from sed_megatron.models.model_file import read_model_file

    info = read_model_file(args.load)
    return ModelConfig.from_megatron_args(args, model_type=None if info is None else info["model_type"])


def model_provider(args, pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Megatron's model_provider: the GPTModel of one pipeline stage, from the typed ModelConfig."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from sed_megatron.models import build_gpt_model

    config = config or core_transformer_config_from_args(args)
    return build_gpt_model(model_config_from_args(args), config, pre_process, post_process, vp_stage, pg_collection)


def step_config(args, loss_cfg):
    from .batch import BatchSpec
    from .step import StepConfig

    batch = BatchSpec(
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        create_attention_mask=args.create_attention_mask_in_dataloader and not packs_thd(args),
        packed_thd=packs_thd(args),
    )
    inject = None
    if args.inject_non_finite:
        from .nonfinite import Injection

        try:  # Megatron's loop counts finished iterations in args.curr_iteration
            inject = Injection.parse(args.inject_non_finite, clock=lambda: args.curr_iteration + 1)
        except ValueError as err:
            fail(str(err))
    from sed_megatron.loss.fused_linear import SCHEMES

    return StepConfig(loss=loss_cfg, batch=batch, with_entropy=args.log_entropy, vocab_size=args.vocab_size,
                      check_non_finite=args.check_for_nan_in_loss_and_grad, inject=inject,
                      fused_linear=args.sft_fused_linear, fused_chunk_tokens=args.sft_fused_chunk_tokens,
                      fused_grad_in_forward=None if args.sft_fused_mode is None else SCHEMES[args.sft_fused_mode])
