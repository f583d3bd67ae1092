"""Training curves of one or more runs (their metrics.jsonl), overlaid in one PNG."""

import os

from sed_megatron.data.jsonl import read_jsonl
from sed_megatron.utils import atomic_path

PANELS = (("loss", "objective"), ("ce_loss", "cross-entropy"), ("mask_rate", "SED mask rate"),
          ("topk_mass", "top-k mass"))


def read_run(spec):
    """(label, records) of a run given as LABEL=PATH or PATH (labelled by its directory)."""
    label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    label = label or os.path.basename(os.path.dirname(os.path.abspath(path)))
    return label, read_jsonl(path, dict)


def plot_runs(runs, out):
    """runs: [(label, records)]; writes the PNG at out (whole or not at all)."""
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
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
