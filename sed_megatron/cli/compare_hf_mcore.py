"""The same tokens through transformers and through the converted Megatron model at TP x PP.

    python tools/compare_hf_mcore.py --hf-dir HF_DIR --load CKPT_DIR --tp 2 [--pp N] [--ep N]
    torchrun --nproc_per_node 2 tools/compare_hf_mcore.py --hf-dir HF_DIR --load CKPT_DIR --tp 2

Loads the Megatron checkpoint (architecture from its sed_megatron_model.yaml) at tensor
parallel size --tp and pipeline parallel size --pp (--ep: expert parallel, MoE models), on
tp x pp x ep processes (started by itself without torchrun), runs a seeded batch of random
token ids, gathers the vocab-parallel logits, drops the padding ids, and compares with the
Hugging Face model's logits. It checks the mapping whatever the checkpoint's dtype: both run in
fp32 by default (tolerance 1e-3); --compute-dtype bfloat16 compares bf16 with bf16, held to twice
transformers' own bf16-vs-fp32 difference on the same tokens. The last line is
`max_abs_logit_diff=<float>`; exit 0 only within the tolerance, else 1 with one line on stderr.
"""

import argparse
import os
import sys

from sed_megatron.utils import help_sections

PROG = "compare_hf_mcore.py"


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, **help_sections(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--load", required=True, help="Megatron checkpoint (converted or trained)")
    parser.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: the world size / pp / ep)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE models)")
    parser.add_argument("--atol", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="float32 (default): checks the mapping on any checkpoint; bfloat16: the training precision")
    parser.add_argument("--verbose", action="store_true", help="show Megatron's start-up output and warnings")
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    options = build_parser().parse_args(argv)
    from sed_megatron.runtime import quiet_tool

    if not options.verbose:
        quiet_tool()
    from sed_megatron.convert.compare import compare_hf_mcore
    from sed_megatron.utils import fail, quiet_stdout
    from sed_megatron.world import single_process_env

    tp = options.tp
    if tp is None:
        tp = max(int(os.environ.get("WORLD_SIZE", "1")) // max(options.pp * options.ep, 1), 1)
    processes = tp * options.pp * options.ep
    if "RANK" not in os.environ:  # not under torchrun: start the ranks here
        if processes > 1:
            from sed_megatron.launch import spawn_workers

            return spawn_workers(__name__, argv, processes)
        single_process_env()
    try:
        with quiet_stdout(not options.verbose):
            result = compare_hf_mcore(options.hf_dir, options.load, tp=tp, pp=options.pp, ep=options.ep,
                                      atol=options.atol, batch_size=options.batch_size,
                                      seq_length=options.seq_length, seed=options.seed,
                                      compute_dtype=options.compute_dtype)
    except ValueError as err:
        fail(err, PROG)  # one line, exit 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0 if result.ok else 1
    print(f"compare: {result.describe_tolerance()}", flush=True)
    print(f"max_abs_logit_diff={result.max_abs_logit_diff!r}", flush=True)
    if not result.ok:
        hint = ("the two models differ beyond rounding: the conversion is wrong for this model"
                if result.compute_dtype == "float32" else
                "bf16 rounding beyond the expected: check in fp32 (the default), which tests the mapping")
        print(f"{PROG}: error: max_abs_logit_diff {result.max_abs_logit_diff:.4g} exceeds the "
              f"{result.describe_tolerance()}: {hint}", file=sys.stderr, flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
