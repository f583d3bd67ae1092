"""Hugging Face directory (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE) -> Megatron distributed checkpoint.

    python tools/convert_hf_to_mcore.py --hf-dir HF_DIR --save CKPT_DIR [--dtype bfloat16] [--overwrite]
    python tools/convert_hf_to_mcore.py --hf-dir HF_DIR --adapter PEFT_ADAPTER_DIR --save LORA_CKPT
    torchrun --nproc_per_node 2 -m sed_megatron.train --config run.yaml --load CKPT_DIR --finetune ...

Writes Megatron-LM's torch_dist checkpoint of a TP=1 model (training loads it at any TP x PP)
and `sed_megatron_model.yaml` with the architecture, which training reads from --load. The
dtype of the Hugging Face weights is kept unless --dtype says otherwise. Bad input (an
unsupported model_type, a missing or corrupt shard, a shape mismatch, a non-empty output
directory) stops with one line and leaves nothing at --save. With --adapter, a PEFT LoRA adapter
trained on HF_DIR comes along: the checkpoint continues training with --load LORA_CKPT
--lora-rank R (the adapter's rank) and exports again with --adapter-only.
"""

import argparse
import sys

from sed_megatron.utils import help_sections

PROG = "convert_hf_to_mcore.py"


def build_parser():
    from sed_megatron.convert.hf_to_mcore import DTYPES

    parser = argparse.ArgumentParser(prog=PROG, **help_sections(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json, safetensors)")
    parser.add_argument("--save", required=True, help="output checkpoint directory")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the Hugging Face config's dtype")
    parser.add_argument("--adapter", default=None,
                        help="a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) on HF_DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save once converted")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    parser.add_argument("--verbose", action="store_true", help="show Megatron's start-up output and warnings")
    return parser


def main(argv=None):
    options = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from sed_megatron.runtime import quiet_tool

    if not options.verbose:
        quiet_tool()
    from sed_megatron.convert.hf_to_mcore import convert_hf_to_mcore
    from sed_megatron.utils import fail, quiet_stdout

    try:
        with quiet_stdout(not options.verbose):
            done = convert_hf_to_mcore(options.hf_dir, options.save, dtype=options.dtype, overwrite=options.overwrite,
                                       progress=not options.quiet and sys.stderr.isatty(), adapter=options.adapter)
    except ValueError as err:
        fail(err, PROG)  # one line, exit 2
    print(f"saved {done.path} ({done.model_cfg.model_type}, {done.dtype}, padded vocab {done.model_cfg.padded_vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
