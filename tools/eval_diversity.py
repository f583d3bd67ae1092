"""Sample several responses per prompt and measure diversity (Self-BLEU, distinct-n) and accuracy (pass@k).

    python tools/eval_diversity.py --hf-dir HF_DIR --prompts test.jsonl --num-samples 8 --out result.json
    python tools/eval_diversity.py --hf-dir HF_DIR --prompts gsm8k/test.jsonl --prompt-key question \\
        --answer-key answer --num-samples 16 --k 8 --max-new-tokens 512 --out gsm8k.json

A shim: the command lives in sed_megatron/cli/eval_diversity.py (also installed as `sed-eval-diversity`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sed_megatron.cli.eval_diversity import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
