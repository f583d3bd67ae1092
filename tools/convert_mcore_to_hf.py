"""Megatron checkpoint (converted or trained, any TP x PP) -> Hugging Face directory.

    python tools/convert_mcore_to_hf.py --load CKPT_DIR --save HF_DIR [--hf-template HF_DIR] [--overwrite]

Reads the checkpoint one decoder layer at a time (whatever TP x PP wrote it), maps the weights
back (the per-group QKV split, gate/up split, padding rows dropped, tied embeddings left tied)
and writes safetensors shards as they fill, with an index and a config.json for the
architecture: memory stays near one shard plus one layer. With --hf-template, the tokenizer and
generation files are copied from it and its special-token ids are kept. The output loads with
transformers.AutoModelForCausalLM.from_pretrained.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sed_megatron.cli.convert_mcore_to_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
