"""The same tokens through transformers and through the converted Megatron model at TP x PP.

    torchrun --nproc_per_node 2 tools/compare_hf_mcore.py --hf-dir HF_DIR --load CKPT_DIR --tp 2 [--pp N] [--ep N]

Loads the Megatron checkpoint (architecture from its sed_megatron_model.yaml) at tensor
parallel size --tp and pipeline parallel size --pp (--ep: expert parallel, MoE models), on
tp x pp x ep processes, runs a seeded batch of random token ids, gathers the vocab-parallel
logits, drops the padding ids, and compares with the Hugging Face model's logits (fp32). The
last line is `max_abs_logit_diff=<float>`; the exit code is 0 only within --atol (default
1e-3 for an fp32 checkpoint, 0.5 for bf16/fp16, whose Megatron forward runs in that precision).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sed_megatron.cli.compare_hf_mcore import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
