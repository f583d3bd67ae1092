"""The same tokens through transformers and through the converted Megatron model at TP x PP.

    torchrun --nproc_per_node 2 tools/compare_hf_mcore.py --hf-dir HF_DIR --load CKPT_DIR --tp 2 [--pp N] [--ep N]

Loads the Megatron checkpoint (architecture from its sed_megatron_model.yaml) at tensor
parallel size --tp and pipeline parallel size --pp (--ep: expert parallel, MoE models), on
tp x pp x ep processes, runs a seeded batch of random token ids, gathers the vocab-parallel
logits, drops the padding ids, and compares with the Hugging Face model's logits (fp32). The
last line is `max_abs_logit_diff=<float>`; the exit code is 0 only within --atol (default
1e-3 for an fp32 checkpoint, 0.5 for bf16/fp16, whose Megatron forward runs in that precision).
"""

import argparse
import os
import sys

PROG = "compare_hf_mcore.py"


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--load", required=True, help="Megatron checkpoint (converted or trained)")
    parser.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: the world size / pp / ep)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE models)")
    parser.add_argument("--atol", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    options = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from sed_megatron.convert.compare import compare_hf_mcore
    from sed_megatron.utils import fail

    tp = options.tp
    if tp is None:
        tp = max(int(os.environ.get("WORLD_SIZE", "1")) // max(options.pp * options.ep, 1), 1)
    try:
        result = compare_hf_mcore(options.hf_dir, options.load, tp=tp, pp=options.pp, ep=options.ep, atol=options.atol,
                                  batch_size=options.batch_size, seq_length=options.seq_length, seed=options.seed)
    except ValueError as err:
        fail(err, PROG)  # one line, exit 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"max_abs_logit_diff={result.max_abs_logit_diff!r}", flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
