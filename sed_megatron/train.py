"""SFT with SED-SFT, CE, DFT or GEM on Megatron-LM's training loop, at any TP x PP x DP.

    torchrun --nproc_per_node 2 -m sed_megatron.train --config examples/tiny_cpu.yaml [--flag value ...]
    python -m sed_megatron.train --config examples/tiny_cpu.yaml     # starts this machine's ranks itself

Flags on the command line win over the YAML; every Megatron-LM flag works. Without torchrun it
starts one model replica's ranks on a CPU, one rank per GPU on a GPU machine. On GPUs nothing is
changed (NCCL, bf16, Transformer Engine when installed); without any GPU the CPU layer runs it
over gloo; a GPU that torch cannot see stops the run (sed_megatron/runtime).
"""

import dataclasses
import functools
import json
import os
import shutil
import sys

import torch.distributed as dist

from sed_megatron.runtime import DeviceError, MegatronVersionError, prepare
from sed_megatron.training.datasets import build_datasets
from sed_megatron.training.parse import parse_run_args, print_help_if_asked
from sed_megatron.training.run_config import run_config
from sed_megatron.utils import atomic_write_text, fail
from sed_megatron.world import model_provider

PROG = "sed_megatron.train"
TAU_FILE = "sed_tau.json"


def _tau(run, model, iteration):
    """Tau from the initial model (run.tau_calibration), stored in <save>/sed_tau.json.

    A resumed run (iteration > 0: the checkpoint's) reads tau back from <load>/sed_tau.json
    instead of calibrating a model that has already trained, and copies the file into a new --save."""
    from megatron.training.utils import print_rank_0

    from sed_megatron.training.calibrate import calibrate_tau

    calibration = run.tau_calibration
    if iteration > 0:
        stored = os.path.join(run.load or "", TAU_FILE)
        if not os.path.exists(stored):
            raise SystemExit(f"{PROG}: error: resuming at iteration {iteration} with --sed-calibrate-ratio "
                             f"needs the calibrated tau in {stored}")
        with open(stored) as f:
            tau = json.load(f)["tau"]
        print_rank_0(f"SED tau={tau!r} (calibrated earlier, read from {stored})")
        if run.save and os.path.abspath(run.save) != os.path.abspath(run.load) and dist.get_rank() == 0:
            os.makedirs(run.save, exist_ok=True)  # so a resume from the new directory finds it too
            shutil.copy(stored, os.path.join(run.save, TAU_FILE))
        return tau
    n = calibration.samples
    dataset = build_datasets(run.data, [n, n, 0])[1]
    # training's k unless the published mode or --sed-calibrate-top-k says otherwise
    calibration_cfg = dataclasses.replace(run.step, loss=run.step.loss.replace(top_k=calibration.top_k))
    tau = calibrate_tau(model, dataset, n, calibration_cfg, calibration.ratio, calibration.tokens)
    print_rank_0(f"SED tau={tau!r} calibrated on {n} samples ({calibration.tokens} tokens, "
                 f"k={calibration.top_k}, mask ratio {calibration.ratio})")
    if run.save and dist.get_rank() == 0:
        os.makedirs(run.save, exist_ok=True)
        atomic_write_text(os.path.join(run.save, TAU_FILE), json.dumps({
            "tau": tau, "mask_ratio": calibration.ratio, "top_k": calibration.top_k, "samples": n,
            "tokens": calibration.tokens}))
    return tau


def _before_training(run, iteration, model):
    """The forward step the loop trains with, once the model exists (tau calibrated if asked);
    iteration() is the one Megatron loaded (0 for a fresh run)."""
    from sed_megatron.training.step import forward_step

    if run.lora is not None:
        _lora_started(run, model)
    step_cfg = run.step
    if run.tau_calibration is not None:
        tau = _tau(run, model, iteration())
        step_cfg = dataclasses.replace(step_cfg, loss=step_cfg.loss.replace(tau=tau))
    return functools.partial(forward_step, step_cfg)


def _lora_started(run, model):
    """Once the base is loaded: the adapters go into every checkpoint from now on; the start line."""
    from megatron.training.utils import print_rank_0

    from sed_megatron.lora import set_checkpoint_parts

    set_checkpoint_parts(model, "adapters")  # every save: the adapters (the base stays in run.lora_base)
    lora, trainable = run.lora, run.lora_parameters
    print_rank_0(f"LoRA: rank {lora.rank}, alpha {lora.alpha:g} (scaling {lora.scaling:g}), "
                 f"{','.join(lora.target_modules)}: {trainable:,} trainable parameters, the base frozen "
                 f"({'continued from' if run.lora_loaded else 'new, on'} {run.lora_base}); optimizer state "
                 f"{trainable * 12 / 2**20:.1f} MiB (fp32 copy and Adam moments, split over DP with the "
                 f"distributed optimizer)")


def _keep_run_files(run):
    """Beside the run's checkpoints: the architecture file of the converted checkpoint it loaded,
    and for LoRA what the adapters are and their base."""
    from sed_megatron.models.model_file import MODEL_FILE

    if not run.save or (dist.is_initialized() and dist.get_rank() != 0):
        return
    source = os.path.join(run.load or "", MODEL_FILE)
    if run.load and os.path.exists(source) and os.path.abspath(run.load) != os.path.abspath(run.save):
        os.makedirs(run.save, exist_ok=True)
        shutil.copy(source, os.path.join(run.save, MODEL_FILE))
    if run.lora is not None:
        from sed_megatron.lora import write_lora_file

        write_lora_file(run.save, run.lora, run.lora_base)


def main(argv=None):
    from sed_megatron.training.resume import record_exception

    try:
        return _train(argv)
    except BaseException as err:  # the error this rank ends with, for a restart's account (<save>/.run)
        record_exception(err)
        raise
    finally:
        _release_save_lock()


def _train(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    print_help_if_asked(argv, PROG, __doc__)
    try:
        runtime = prepare(training=True, verbose="--verbose" in argv)
    except (DeviceError, MegatronVersionError) as err:
        fail(str(err), PROG)
    _lock_save_dir(argv, runtime)  # global rank 0: one live run writes --save (an existing one: locked now)
    argv = _load_hf_model(argv, runtime)
    argv = _tokenize_chat_data(argv, runtime)
    if _already_trained(argv, runtime):
        return 0
    if "RANK" not in os.environ:  # not under torchrun: this machine's ranks, started here
        from sed_megatron.launch import local_world_size
        from sed_megatron.training.parse import parse_flags
        from sed_megatron.utils import UsageError

        flags = parse_flags(argv, runtime)
        model_parallel = (flags.tensor_model_parallel_size * flags.pipeline_model_parallel_size
                          * flags.context_parallel_size)
        try:  # CPU: one replica; GPUs: all of them, as data-parallel replicas
            nproc, notice = local_world_size(model_parallel, runtime.device, _gpu_count(runtime))
        except UsageError as err:
            fail(str(err), PROG)
        if notice:
            print(f"{PROG}: {notice}", flush=True)
        if nproc > 1:
            from sed_megatron.launch import spawn_workers
            from sed_megatron.training.parse import check_before_spawn

            check_before_spawn(argv, runtime, nproc, description=__doc__)
            return spawn_workers("sed_megatron.train", argv, nproc, env=runtime.launch_env())
        from sed_megatron.world import single_process_env

        single_process_env()
    state, argv = _resume(argv, runtime)
    args, loss_cfg = parse_run_args(argv, runtime, description=__doc__)

    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from sed_megatron.training import hooks
    from sed_megatron.training.metrics import MetricsLog
    from sed_megatron.training.resume import attempt_store
    from sed_megatron.training.step import forward_step

    run = run_config(args, loss_cfg)  # the Namespace read once; Megatron keeps it for its own loop
    metrics = MetricsLog(run.metrics_file, tokens_per_iteration=run.tokens_per_iteration)
    loop = _loop_supervisor(args, state, metrics)
    try:
        hooks.install(functools.partial(_before_training, run, lambda: args.iteration), metrics, run.log_interval,
                      current_iteration=lambda: args.curr_iteration + 1, loop=loop,
                      start_iteration=lambda: args.iteration)
        from sed_megatron.training.checkpoints import install_save_hooks

        # retention, the write's error, its injection
        install_save_hooks(run.save, run.keep_last, run.save_error, synchronous=not args.async_save)
    except MegatronVersionError as err:
        fail(str(err), PROG)
    _lock_save_dir(argv, runtime, save=run.save)  # a --save this run makes: once its start-up checks passed
    _keep_run_files(run)
    exports = None
    if args.save_hf and args.save_hf_every_save:
        exports = _ExportsAfterSaves(args.save, args.save_hf, args.save_hf_template)
        hooks.after_saves(exports.after_save)
    cfg = pretrain_cfg_container_from_args(args, model_cfg=None)  # None: our model provider builds it
    try:
        pretrain(
            cfg,
            functools.partial(build_datasets, run.data),
            ModelType.encoder_or_decoder,
            functools.partial(forward_step, run.step),  # replaced by _before_training's once the model exists
            model_provider=functools.partial(model_provider, args, lora=run.lora,
                                             lora_base=run.lora_base if run.lora_loaded else None),
            store=attempt_store(args.distributed_timeout_minutes),  # None but at a torchrun restart
        )
    except (OSError, CheckpointingException) as err:
        if not run.save:
            raise
        from sed_megatron.training.checkpoints import first_write_error

        err = first_write_error() or err  # the write's own error (a full disk: its errno), which Megatron wraps
        # A save that fails leaves the tracker on the previous complete checkpoint (written last).
        print(f"{PROG}: error: iteration {args.curr_iteration + 1}: {type(err).__name__}: {err}".splitlines()[0]
              + f" (the newest complete checkpoint in {run.save}: {_latest(run.save)})", file=sys.stderr, flush=True)
        sys.exit(4)
    if args.save_hf and int(os.environ.get("RANK", "0")) == 0:
        if exports is None or not exports.finish():
            _save_hf(args.save, args.save_hf, args.save_hf_template)


def _load_hf_model(argv, runtime):
    """--load HF_DIR (a Hugging Face model directory): argv loading its conversion instead, made
    once into a cache (<save>/hf_converted, or --hf-cache-dir) and reused while the source is
    unchanged, or the run's own newest checkpoint in --save when there is one (a resume). The
    export at the end takes its tokenizer files from HF_DIR. Under torchrun global rank 0
    converts and the other ranks wait for the cache."""
    from sed_megatron.convert.hf_cache import cached_source, converted_checkpoint, is_hf_model_dir, source_of
    from sed_megatron.training.parse import parse_flags
    from sed_megatron.training.resume import resume_dir

    flags = parse_flags(argv, runtime)
    hf_dir = flags.load
    if not is_hf_model_dir(hf_dir):
        return argv
    extra = [] if flags.save_hf_template else ["--save-hf-template", hf_dir]
    rank = int(os.environ.get("RANK", "0"))
    if resume_dir(flags) is not None:  # the run's own newest checkpoint instead (_resume says so)
        return [*argv, "--load", flags.save, *extra]
    cache = flags.hf_cache_dir or (os.path.join(flags.save, "hf_converted") if flags.save else None)
    if cache is None:
        fail(f"--load {hf_dir} is a Hugging Face model directory: its conversion needs --save (it is cached "
             f"there) or --hf-cache-dir", PROG)
    if rank == 0:
        try:
            _, note = converted_checkpoint(hf_dir, cache, log=f"{cache.rstrip('/')}.log")
        except ValueError as err:
            fail(f"--load {hf_dir}: {err}", PROG)
        print(f"{PROG}: {note}", flush=True)
    else:
        import time

        source = source_of(hf_dir)
        while cached_source(cache) != source:  # rank 0 converts (torchrun stops every rank if it fails)
            time.sleep(1.0)
    return [*argv, "--load", cache, "--finetune", "--no-load-optim", "--no-load-rng", *extra]


def _already_trained(argv, runtime):
    """True when --save's newest checkpoint is at --train-iters or beyond (the run is done: run again,
    it would resume with nothing to train, which Megatron's data sampler refuses): said in one line,
    and the --save-hf export made if it is missing."""
    from sed_megatron.training.parse import parse_flags
    from sed_megatron.training.resume import checkpoint_iteration, resume_dir

    flags = parse_flags(argv, runtime)
    save = resume_dir(flags)
    if save is None or not flags.train_iters or checkpoint_iteration(save) < flags.train_iters:
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{PROG}: the newest checkpoint in {save} is at iteration {checkpoint_iteration(save)}, --train-iters "
              f"{flags.train_iters}: nothing left to train (a larger --train-iters continues; --no-resume starts "
              f"afresh)", flush=True)
        if flags.save_hf and not os.path.exists(os.path.join(flags.save_hf, "config.json")):
            _save_hf(save, flags.save_hf, flags.save_hf_template)
    return True


def _resume(argv, runtime):
    """(this attempt's RunState, argv): at a torchrun restart the account of the failed attempt
    (or the stop of one that would not make progress, exit 5); argv loading the newest checkpoint
    in --save when there is one (unless --no-resume). Before Megatron starts: cheap."""
    from sed_megatron.training.parse import parse_flags
    from sed_megatron.training.resume import RunState, resumed_argv

    flags = parse_flags(argv, runtime)
    state = RunState.at_start(flags.save, PROG)
    return state, resumed_argv(argv, flags, PROG)


def _loop_supervisor(args, state, metrics):
    """The restart's account, the hang watchdog (--hang-timeout-minutes) and the test faults
    (--inject-fault) beside the training loop."""
    from sed_megatron.training.faults import FaultInjection
    from sed_megatron.training.resume import LoopSupervisor
    from sed_megatron.training.watchdog import Watchdog

    faults = FaultInjection(args.inject_fault, lambda: args.curr_iteration + 1) if args.inject_fault else None
    return LoopSupervisor(state, Watchdog(args.hang_timeout_minutes * 60, prog=PROG), faults, metrics)


def _tokenize_chat_data(argv, runtime):
    """--sft-data-kind chat: the data (any preprocess_sft_data.py --input) tokenized with
    --sft-tokenizer (default: the Hugging Face --load) into <save>/data_cache (or
    --sft-data-cache-dir) unless it is there already, and argv reading that indexed dataset.
    Global rank 0 tokenizes; the other ranks wait for it."""
    from sed_megatron.data.cache import cache_key, done, tokenized_dataset
    from sed_megatron.data.sft_preprocess import PreprocessConfig
    from sed_megatron.training.parse import parse_flags

    flags = parse_flags(argv, runtime)
    if flags.sft_data_kind != "chat":
        return argv
    if not flags.sft_data_path:
        fail("--sft-data-kind chat needs --sft-data-path (YAML data.path): the data to tokenize", PROG)
    tokenizer = flags.sft_tokenizer or flags.save_hf_template
    if not tokenizer:
        fail("--sft-data-kind chat tokenizes --sft-data-path with a Hugging Face tokenizer: give --sft-tokenizer "
             "HF_DIR (YAML data.tokenizer; default: a Hugging Face --load directory)", PROG)
    cache = flags.sft_data_cache_dir or (os.path.join(flags.save, "data_cache") if flags.save else None)
    if cache is None:
        fail("--sft-data-kind chat keeps the tokenized data in <save>/data_cache: give --save or "
             "--sft-data-cache-dir", PROG)
    try:
        cfg = PreprocessConfig(input=flags.sft_data_path, tokenizer=tokenizer, output_prefix="",
                               schema=flags.sft_data_schema, seq_length=flags.seq_length,
                               prompt_key=flags.sft_prompt_key, response_key=flags.sft_response_key,
                               truncation=flags.sft_data_truncation, reasoning=flags.sft_data_reasoning)
        if int(os.environ.get("RANK", "0")) == 0:
            prefix, note = tokenized_dataset(cfg, cache)
            print(f"{PROG}: {note}", flush=True)
        else:
            import time

            directory = os.path.join(cache, cache_key(cfg))
            while done(directory) is None:  # rank 0 tokenizes (torchrun stops every rank if it fails)
                time.sleep(1.0)
            prefix = os.path.join(directory, "data")
    except ValueError as err:
        fail(f"--sft-data-path: {err}", PROG)
    return [*argv, "--sft-data-kind", "indexed", "--sft-data-path", prefix]


def _save_hf(save, save_hf, hf_template):
    """The Hugging Face export of the newest checkpoint in save, at save_hf (replaced whole)."""
    from sed_megatron.convert.mcore_to_hf import convert_mcore_to_hf
    from sed_megatron.launch import OUTSIDE_THE_WORLD, run_isolated

    try:
        run_isolated(convert_mcore_to_hf, save, save_hf, hf_template=hf_template, overwrite=True, progress=False,
                     timeout=24 * 3600, env=OUTSIDE_THE_WORLD)
    except ValueError as err:
        fail(f"--save-hf {save_hf}: {err}", PROG)
    print(f"{PROG}: saved the Hugging Face export of {save} ({_latest(save)}) to {save_hf}", flush=True)


class _ExportsAfterSaves:
    """--save-hf-every-save: on global rank 0, the export of each checkpoint once it is saved,
    in a process of its own while training goes on (one at a time: a save that comes while the
    previous export runs waits for it). The export replaces --save-hf whole; one that fails is
    reported in one line and training goes on."""

    def __init__(self, save, save_hf, hf_template):
        self.save, self.save_hf, self.hf_template = save, save_hf, hf_template
        self.running = None  # (iteration, Isolated)
        self.exported = None  # the iteration --save-hf holds

    def after_save(self, iteration):
        if int(os.environ.get("RANK", "0")) != 0:
            return
        from sed_megatron.convert.mcore_to_hf import convert_mcore_to_hf
        from sed_megatron.launch import OUTSIDE_THE_WORLD, start_isolated

        self._wait()
        log = os.path.join(self.save, "save_hf.log")
        self.running = (iteration, start_isolated(convert_mcore_to_hf, self.save, self.save_hf,
                                                  hf_template=self.hf_template, overwrite=True, progress=False,
                                                  iteration=iteration, env=OUTSIDE_THE_WORLD, log=log))
        print(f"{PROG}: exporting iteration {iteration} to {self.save_hf} (log: {log})", flush=True)

    def _wait(self):
        if self.running is None:
            return
        iteration, export = self.running
        self.running = None
        try:
            export.result(timeout=24 * 3600)
        except Exception as err:  # noqa: BLE001 — one line, and training goes on
            print(f"{PROG}: error: --save-hf-every-save: the export of iteration {iteration} to {self.save_hf} "
                  f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr,
                  flush=True)
            return
        self.exported = iteration
        print(f"{PROG}: saved the Hugging Face export of {self.save} (iteration {iteration}) to {self.save_hf}",
              flush=True)

    def finish(self):
        """At the end: True when --save-hf holds the newest checkpoint (no export left to do)."""
        self._wait()
        return self.exported is not None and _latest(self.save) == f"iteration {self.exported}"


_SAVE_LOCK = []  # the lock this process holds on --save, and whether it set HELD_ENV for its ranks


def _lock_save_dir(argv, runtime, save=None):
    """The lock of --save (training/save_lock.py), taken by global rank 0, or by the process that
    starts this machine's ranks (they find it held): a second run into a --save that a live run
    writes stops in one line naming it (host, pid); a dead run's lock is taken over (said in the
    log). Without `save`, only a --save that exists is locked (a new one is locked after the
    start-up checks, so that a bad input leaves nothing). Released when main returns or exits."""
    from sed_megatron.training.save_lock import HELD_ENV, SaveDirBusy, SaveLock

    if _SAVE_LOCK or os.environ.get(HELD_ENV) or os.environ.get("RANK", "0") != "0":
        return
    if save is None:
        from sed_megatron.training.parse import parse_flags

        save = parse_flags(argv, runtime).save
        if not save or not os.path.isdir(save):
            return
    if not save:
        return
    try:
        lock = SaveLock.acquire(save)
    except SaveDirBusy as err:
        fail(str(err), PROG)
    launcher = "RANK" not in os.environ
    if launcher:
        os.environ[HELD_ENV] = "1"
    _SAVE_LOCK.append((lock, launcher))
    if lock.notice:
        print(f"{PROG}: {lock.notice}", flush=True)


def _release_save_lock():
    from sed_megatron.training.save_lock import HELD_ENV

    while _SAVE_LOCK:
        lock, launcher = _SAVE_LOCK.pop()
        lock.release()
        if launcher:
            os.environ.pop(HELD_ENV, None)


def _gpu_count(runtime):
    import torch

    return 0 if runtime.on_cpu else torch.cuda.device_count()


def _latest(save_dir):
    from megatron.training.checkpointing import get_checkpoint_tracker_filename

    try:
        with open(get_checkpoint_tracker_filename(save_dir)) as f:
            return f"iteration {f.read().strip()}"
    except OSError:
        return "none"


if __name__ == "__main__":
    sys.exit(main())
