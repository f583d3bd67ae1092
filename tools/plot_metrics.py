"""PNG of the training curves of one or more runs, overlaid.

    python tools/plot_metrics.py runs/ce/metrics.jsonl runs/sed/metrics.jsonl --out curves.png
    python tools/plot_metrics.py ce=runs/ce/metrics.jsonl sed=runs/sed/metrics.jsonl --out curves.png

Panels: the objective (`loss`), CE (`ce_loss`), the SED mask rate and the mean top-k mass,
against the iteration. A run is LABEL=PATH or PATH (labelled by its directory).
"""

import argparse
import json
import os
import sys

PANELS = (("loss", "objective"), ("ce_loss", "cross-entropy"), ("mask_rate", "SED mask rate"), ("topk_mass", "top-k mass"))


def read_run(spec):
    label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    label = label or os.path.basename(os.path.dirname(os.path.abspath(path)))
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not JSON ({err.msg})") from None
    if not records:
        raise ValueError(f"{path}: no records")
    return label, records


def plot(runs, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for label, records in runs:
            points = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=label)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    tmp = f"{out}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="[LABEL=]metrics.jsonl")
    parser.add_argument("--out", required=True, help="PNG file")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = [read_run(spec) for spec in options.runs]
    except (OSError, ValueError) as err:
        print(f"plot_metrics.py: error: {err}", file=sys.stderr)
        return 2
    plot(runs, options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
