"""PNG of the training curves of one or more runs, overlaid.

    python tools/plot_metrics.py runs/ce/metrics.jsonl runs/sed/metrics.jsonl --out curves.png
    python tools/plot_metrics.py ce=runs/ce/metrics.jsonl sed=runs/sed/metrics.jsonl --out curves.png

Panels: the objective (`loss`), CE (`ce_loss`), the SED mask rate and the mean top-k mass,
against the iteration. A run is LABEL=PATH or PATH (labelled by its directory).
"""

import argparse
import sys

from sed_megatron.training.curves import plot_runs, read_run
from sed_megatron.utils import fail, help_sections

PROG = "plot_metrics.py"


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, **help_sections(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="[LABEL=]metrics.jsonl")
    parser.add_argument("--out", required=True, help="PNG file")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = [read_run(spec) for spec in options.runs]
    except (OSError, ValueError) as err:
        fail(err, PROG)
    plot_runs(runs, options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
