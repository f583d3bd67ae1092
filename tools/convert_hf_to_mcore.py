"""Hugging Face directory (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE) -> Megatron distributed checkpoint.

    python tools/convert_hf_to_mcore.py --hf-dir HF_DIR --save CKPT_DIR [--dtype bfloat16] [--overwrite]
    torchrun --nproc_per_node 2 -m sed_megatron.train --config run.yaml --load CKPT_DIR --finetune ...

Writes Megatron-LM's torch_dist checkpoint of a TP=1 model (training loads it at any TP x PP)
and `sed_megatron_model.yaml` with the architecture, which training reads from --load. The
dtype of the Hugging Face weights is kept unless --dtype says otherwise. Bad input (an
unsupported model_type, a missing or corrupt shard, a shape mismatch, a non-empty output
directory) stops with one line and leaves nothing at --save.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sed_megatron.cli.convert_hf_to_mcore import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
