"""Set SED's τ from the initial model: the (1 - r) quantile of the top-k mass on a calibration set.

    python tools/calibrate_tau.py --config examples/tiny_cpu.yaml --mask-ratio 0.7
    torchrun --nproc_per_node 2 tools/calibrate_tau.py --config CFG.yaml --load CKPT --mask-ratio 0.7 --write-config CFG_tau.yaml

Without torchrun it starts its processes itself: TP x PP x CP on a CPU, one per GPU on a GPU
machine (data parallel; --nproc to choose).

Runs the model of the run configuration (random init, or the weights of --load) forward only
at any TP x PP x DP on --calibration-samples samples of the validation split (or the training
split), collects the global top-k mass of the response tokens (or of all tokens, or as the
published code did: --calibration-tokens published), and takes the published quantile exactly
over all data-parallel ranks. Prints `tau=<value>` as its last line; --write-config writes the
run configuration with loss.tau set. The options default to the run's loss.calibrate_* settings
(--sed-calibrate-samples, --sed-calibrate-tokens, --sed-calibrate-top-k), so the tool and the
calibration inside training agree.
"""

import os
import sys

from sed_megatron.loss.tau import TOKEN_SETS, calibration_top_k
from sed_megatron.runtime import DeviceError, MegatronVersionError, prepare, quiet_tool
from sed_megatron.training.arguments import TAU_CALIBRATION_FLAGS
from sed_megatron.utils import fail

PROG = "calibrate_tau.py"


def add_calibration_arguments(parser):
    group = parser.add_argument_group("tau calibration")
    group.add_argument("--mask-ratio", type=float, required=True,
                       help="r: the share of tokens left without the SED penalty (paper: 0.7)")
    group.add_argument("--calibration-samples", type=int, default=None,
                       help="samples to score (default: --sed-calibrate-samples, 100 as published)")
    group.add_argument("--calibration-tokens", choices=TOKEN_SETS, default=None,
                       help="response: the loss tokens; all: every position with a target; published: reproduces "
                            "the published calibration (every position of the full input incl. prompt and the last "
                            "token, k = 10) (default: --sed-calibrate-tokens)")
    group.add_argument("--calibration-top-k", type=int, default=None,
                       help="k of the top-k mass (default: --sed-calibrate-top-k, else 10 with published tokens, "
                            "else --sed-top-k)")
    group.add_argument("--calibration-split", choices=["valid", "train"], default="valid")
    group.add_argument("--write-config", default=None, help="write the --config YAML with loss.tau set here")
    group.add_argument("--nproc", type=int, default=None,
                       help="without torchrun: the processes to start (default: TP x PP x CP of the run on a CPU, every GPU "
                            "on a GPU machine)")
    return parser


def _setting(args, option, loss_key):
    """(value, flag that names it): the tool's option if given, else the run's loss.<loss_key>."""
    value = getattr(args, option[2:].replace("-", "_"))
    if value is not None:
        return value, option
    flag = TAU_CALIBRATION_FLAGS[loss_key]
    return getattr(args, flag[2:].replace("-", "_")), f"{flag} (loss.{loss_key})"


def calibration_settings(args):
    """(samples, token set, k) of the calibration; a bad value is a one-line error naming its flag."""
    samples, flag = _setting(args, "--calibration-samples", "calibrate_samples")
    if samples < 1:
        fail(f"{flag} must be >= 1, got {samples}", PROG)
    tokens, _ = _setting(args, "--calibration-tokens", "calibrate_tokens")
    top_k, flag = _setting(args, "--calibration-top-k", "calibrate_top_k")
    if top_k is not None and top_k < 1:
        fail(f"{flag} must be >= 1, got {top_k}", PROG)
    return samples, tokens, calibration_top_k(tokens, args.sed_top_k, top_k)


def check_arguments(args):
    if not 0.0 <= args.mask_ratio <= 1.0:
        fail(f"--mask-ratio must lie in [0, 1], got {args.mask_ratio}", PROG)
    calibration_settings(args)
    if args.write_config and not args.config:
        fail("--write-config needs --config (the YAML to copy)", PROG)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    from sed_megatron.training.parse import print_help_if_asked

    print_help_if_asked(argv, PROG, __doc__, add_calibration_arguments)
    if "--verbose" not in argv:
        quiet_tool()
    try:
        runtime = prepare(training=True, verbose="--verbose" in argv)
    except (DeviceError, MegatronVersionError) as err:
        fail(err, PROG)
    from sed_megatron.training.parse import parse_flags, parse_run_args
    from sed_megatron.utils import quiet_stdout

    if "RANK" not in os.environ:  # not under torchrun: start the ranks here (bad flags are reported first)
        flags = parse_flags(argv, runtime, add_calibration_arguments, PROG)
        check_arguments(flags)
        nproc = flags.nproc
        if nproc is None:  # CPU: one model replica; GPUs: all of them, as data-parallel replicas
            import torch

            from sed_megatron.launch import local_world_size
            from sed_megatron.utils import UsageError

            model_parallel = (flags.tensor_model_parallel_size * flags.pipeline_model_parallel_size
                              * flags.context_parallel_size)
            try:
                nproc, notice = local_world_size(model_parallel, runtime.device,
                                                 0 if runtime.on_cpu else torch.cuda.device_count())
            except UsageError as err:
                fail(err, PROG)
            if notice:
                print(f"{PROG}: {notice}", file=sys.stderr, flush=True)
        if nproc > 1:
            from sed_megatron.launch import spawn_workers
            from sed_megatron.training.parse import check_before_spawn

            check_before_spawn(argv, runtime, nproc, need_loss_config=False,
                               extra_args_provider=add_calibration_arguments, precheck=check_arguments, prog=PROG,
                               description=__doc__)
            return spawn_workers(__name__, argv, nproc, env=runtime.launch_env())
        from sed_megatron.world import single_process_env

        single_process_env()
    verbose = "--verbose" in argv
    with quiet_stdout(not verbose):
        args, _ = parse_run_args(argv, runtime, need_loss_config=False, extra_args_provider=add_calibration_arguments,
                                 precheck=check_arguments, prog=PROG, description=__doc__)

    import torch.distributed as dist

    from sed_megatron.training.arguments import write_config_with_tau
    from sed_megatron.training.calibrate import calibrate_from_args

    samples, tokens, top_k = calibration_settings(args)
    with quiet_stdout(not verbose):
        tau = calibrate_from_args(args, runtime, args.mask_ratio, samples, tokens, args.calibration_split,
                                  progress=sys.stderr.isatty(), top_k=top_k)
    if dist.get_rank() == 0:
        if args.write_config:
            write_config_with_tau(args.config, args.write_config, tau)
        print(f"tau={tau!r}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
