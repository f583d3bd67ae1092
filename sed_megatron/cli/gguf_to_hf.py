"""GGUF file (llama.cpp) -> Hugging Face directory that transformers and convert_hf_to_mcore.py load.

    python tools/gguf_to_hf.py --gguf FILE.gguf --save HF_DIR [--dtype bfloat16] [--overwrite]

Dequantizes every tensor (Q4_1, Q8_0, K-quants, F16, ...) with transformers and writes
--dtype safetensors (sharded, with an index, above --max-shard-size-mb), config.json, the
tokenizer with the file's chat template, and generation_config.json. GGUF architectures: llama
(also Mistral) and qwen2. Needs the gguf and
accelerate packages (pip install 'sed_megatron[gguf]'). Bad input (a missing file, not a GGUF,
an unsupported architecture, a non-empty --save without --overwrite) stops with one line and
leaves nothing at --save.
"""

import argparse
import sys

from sed_megatron.utils import help_sections

PROG = "gguf_to_hf.py"


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, **help_sections(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="the .gguf file")
    parser.add_argument("--save", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="dtype of the written weights (default bfloat16)")
    parser.add_argument("--max-shard-size-mb", type=int, default=5120, help="safetensors shard size (default 5120)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    return parser


def main(argv=None) -> int:
    options = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from sed_megatron.convert.gguf import gguf_to_hf

    try:
        summary = gguf_to_hf(options.gguf, options.save, dtype=options.dtype, overwrite=options.overwrite,
                             max_shard_bytes=options.max_shard_size_mb * 2**20)
    except ValueError as err:  # UsageError, and the output-directory check the converters share
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    notes = []
    if not summary["chat_template"]:
        notes.append("no chat template in the file (tokenizer.chat_template)")
    if summary["digits_split"]:
        notes.append("digits split one by one before the GPT-2 split, as llama.cpp's tokenizer.ggml.pre says")
    if summary["rope_scaling"]:
        notes.append(f"Llama-3 RoPE scaling, factor {summary['rope_scaling']['factor']:g}, from rope_freqs.weight")
    print(f"saved {summary['save']} ({summary['architecture']}, {summary['dtype']}, {summary['tensors']} tensors, "
          f"{summary['bytes'] / 2**20:.0f} MiB, from {'/'.join(summary['quantization'])}; "
          f"tokenizer {summary['tokenizer_size']} tokens, chat template {'yes' if summary['chat_template'] else 'no'})")
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
