"""Set SED's τ from the initial model: the (1 - r) quantile of the top-k mass on a calibration set.

    torchrun --nproc_per_node 2 tools/calibrate_tau.py --config examples/tiny_cpu.yaml --mask-ratio 0.7
    torchrun ... tools/calibrate_tau.py --config CFG.yaml --load CKPT --mask-ratio 0.7 --write-config CFG_tau.yaml

Runs the model of the run configuration (random init, or the weights of --load) forward only
at any TP x PP x DP on --calibration-samples samples of the validation split (or the training
split), collects the global top-k mass (k = the run's --sed-top-k) of the response tokens (or of
all tokens, as the published code did), and takes the published quantile exactly over all
data-parallel ranks. Prints `tau=<value>` as its last line; --write-config writes the run
configuration with loss.tau set.
"""

import functools
import os
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sed_megatron.calibration import TOKEN_SETS  # noqa: E402
from sed_megatron.runtime import prepare  # noqa: E402
from sed_megatron.training.setup import build_datasets, fail, model_provider, parse_run_args, step_config  # noqa: E402

PROG = "calibrate_tau.py"


def add_calibration_arguments(parser):
    group = parser.add_argument_group("tau calibration")
    group.add_argument("--mask-ratio", type=float, required=True,
                       help="r: the share of tokens left without the SED penalty (paper: 0.7)")
    group.add_argument("--calibration-samples", type=int, default=100, help="samples to score (published: 100)")
    group.add_argument("--calibration-tokens", choices=TOKEN_SETS, default="response",
                       help="response: the loss tokens; all: every position (the published code)")
    group.add_argument("--calibration-split", choices=["valid", "train"], default="valid")
    group.add_argument("--write-config", default=None, help="write the --config YAML with loss.tau set here")
    return parser


def check_arguments(args):
    if not 0.0 <= args.mask_ratio <= 1.0:
        fail(f"--mask-ratio must lie in [0, 1], got {args.mask_ratio}", PROG)
    if args.calibration_samples < 1:
        fail(f"--calibration-samples must be >= 1, got {args.calibration_samples}", PROG)
    if args.write_config and not args.config:
        fail("--write-config needs --config (the YAML to copy)", PROG)


def write_config(source, target, tau):
    with open(source) as f:
        config = yaml.safe_load(f) or {}
    config.setdefault("loss", {})["tau"] = tau
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    os.replace(tmp, target)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    runtime = prepare(training=True)
    args, _ = parse_run_args(argv, runtime, need_loss_config=False, extra_args_provider=add_calibration_arguments,
                             precheck=check_arguments)

    import torch.distributed as dist
    from megatron.core.enums import ModelType
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import get_model

    from sed_megatron.loss import LossConfig
    from sed_megatron.training.calibrate import calibrate_tau

    initialize_megatron(allow_no_cuda=runtime.on_cpu)
    model = get_model(functools.partial(model_provider, args), ModelType.encoder_or_decoder, wrap_with_ddp=False)
    if args.load:
        # Weights only: no optimizer, scheduler or RNG state, whatever the checkpoint holds.
        args.finetune, args.no_load_optim, args.no_load_rng = True, True, True
        load_checkpoint(model, None, None)
    n = args.calibration_samples
    split = 0 if args.calibration_split == "train" else 1
    dataset = build_datasets(args, [n, n, 0])[split]
    tau = calibrate_tau(model, dataset, n, step_config(args, LossConfig(top_k=args.sed_top_k)), args.mask_ratio,
                        args.calibration_tokens)
    if dist.get_rank() == 0:
        if args.write_config:
            write_config(args.config, args.write_config, tau)
        print(f"tau={tau!r}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
