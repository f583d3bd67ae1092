"""PNG of the training curves of one or more runs, overlaid.

    python tools/plot_metrics.py runs/ce/metrics.jsonl runs/sed/metrics.jsonl --out curves.png
    python tools/plot_metrics.py ce=runs/ce/metrics.jsonl sed=runs/sed/metrics.jsonl --out curves.png

A shim: the command lives in sed_megatron/cli/plot_metrics.py (also installed as `sed-plot-metrics`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sed_megatron.cli.plot_metrics import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
