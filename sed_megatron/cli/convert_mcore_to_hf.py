"""Megatron checkpoint (converted or trained, any TP x PP) -> Hugging Face directory.

    python tools/convert_mcore_to_hf.py --load CKPT_DIR --save HF_DIR [--hf-template HF_DIR] [--overwrite]
    python tools/convert_mcore_to_hf.py --load LORA_CKPT --save ADAPTER_DIR --adapter-only [--hf-template HF_DIR]

Reads the checkpoint one decoder layer at a time (whatever TP x PP wrote it), maps the weights
back (the per-group QKV split, gate/up split, padding rows dropped, tied embeddings left tied)
and writes safetensors shards as they fill, with an index and a config.json for the
architecture: memory stays near one shard plus one layer. With --hf-template, the tokenizer and
generation files are copied from it and its special-token ids are kept. The output loads with
transformers.AutoModelForCausalLM.from_pretrained.

A checkpoint trained with --lora-rank exports as the merged model (base + scaling B A), or with
--adapter-only as a PEFT adapter directory (adapter_config.json, adapter_model.safetensors;
base_model_name_or_path: --hf-template, else the base checkpoint the run started from), which
peft.PeftModel.from_pretrained(base, ADAPTER_DIR) loads on the exported base.
"""

import argparse
import sys

from sed_megatron.utils import help_sections

PROG = "convert_mcore_to_hf.py"


def build_parser():
    from sed_megatron.convert.hf_to_mcore import DTYPES

    parser = argparse.ArgumentParser(prog=PROG, **help_sections(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="Megatron checkpoint directory (converted or trained)")
    parser.add_argument("--save", required=True, help="output Hugging Face directory")
    parser.add_argument("--hf-template", default=None, help="Hugging Face directory for tokenizer and generation files")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the dtype the checkpoint was converted with")
    parser.add_argument("--max-shard-size-mb", type=int, default=5000)
    parser.add_argument("--adapter-only", action="store_true",
                        help="a LoRA checkpoint: write its adapters as a PEFT adapter directory, not the merged model")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save once exported")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    parser.add_argument("--verbose", action="store_true", help="show Megatron's start-up output and warnings")
    return parser


def main(argv=None):
    options = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from sed_megatron.runtime import quiet_tool

    if not options.verbose:
        quiet_tool()
    from sed_megatron.convert.mcore_to_hf import convert_mcore_to_hf
    from sed_megatron.utils import fail, quiet_stdout

    try:
        with quiet_stdout(not options.verbose):
            done = convert_mcore_to_hf(options.load, options.save, hf_template=options.hf_template,
                                       dtype=options.dtype, max_shard_size_mb=options.max_shard_size_mb,
                                       overwrite=options.overwrite, adapter_only=options.adapter_only,
                                       progress=not options.quiet and sys.stderr.isatty())
    except ValueError as err:
        fail(err, PROG)  # one line, exit 2
    print(f"saved {done.path} ({done.model_cfg.model_type}, {done.dtype}, {done.count} tensors)")
    for note in done.notes:
        print(f"  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
