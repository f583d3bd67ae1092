"""SFT data -> Megatron indexed dataset with assistant-only loss masks.

    python tools/preprocess_sft_data.py --input chats.jsonl --tokenizer HF_DIR --output-prefix data/sft --seq-length 1024
    python tools/preprocess_sft_data.py --input gsm8k.jsonl --prompt-key question --response-key answer \\
        --tokenizer HF_DIR --output-prefix data/gsm8k --seq-length 1024 --workers 8

A shim: the command lives in sed_megatron/cli/preprocess_sft_data.py (also installed as `sed-preprocess-sft-data`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sed_megatron.cli.preprocess_sft_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
