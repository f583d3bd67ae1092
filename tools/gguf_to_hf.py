"""GGUF file -> Hugging Face directory (see sed_megatron/cli/gguf_to_hf.py).

    python tools/gguf_to_hf.py --gguf FILE.gguf --save HF_DIR [--dtype bfloat16] [--overwrite]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sed_megatron.cli.gguf_to_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
