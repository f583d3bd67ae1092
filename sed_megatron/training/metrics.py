"""Per-token training metrics: what the loss function reports and how it lands in metrics.jsonl.

The loss function reports each metric as a `[sum, count]` pair over this micro-batch's loss
tokens; Megatron's loop adds the pairs over micro-batches and data- x context-parallel ranks
(its dp_cp group), so each logged value is a token-weighted mean over the whole global batch.
MoE models add `moe_aux_loss`: the routers' load-balancing loss as Megatron reports it
(`load_balancing_loss`: before its coefficient, the mean over MoE layers and micro-batches,
averaged over DP), whose moe_aux_loss_coeff multiple Megatron adds to the objective's gradient
beside `loss`.
"""

import json
import os
import time

import torch

from sed_megatron.utils import atomic_write_text

# Report keys (as Megatron logs them) whose metrics.jsonl key is not the report key with "_" for " ".
RENAMED = {
    "lm loss": "loss",  # the objective, whatever the kind
    "load_balancing_loss": "moe_aux_loss",  # Megatron's MoE metrics tracker (MoE models)
}
# The stats every kind returns -> their report keys (the kind's own reports: "<kind> <stat>").
STANDARD_REPORTS = {"ce": "ce loss", "topk_mass": "topk mass", "p_target": "p target", "correct": "token accuracy",
                    "entropy": "entropy"}


def metrics_key(report_key):
    """The metrics.jsonl key of a report key: "ce loss" -> "ce_loss", "sed penalty" -> "sed_penalty"."""
    return RENAMED.get(report_key, report_key.replace(" ", "_"))


def token_metric_report(loss_sum, stats, loss_mask, kind_name):
    """`[sum, count]` pairs of the objective (its sum over the loss tokens) and the stats over
    the loss tokens, detached; the kind's own stats (`LossKind.reports`) as "<kind> <stat>".

    mask rate follows the published SED-SFT logs: the share of loss tokens WITHOUT the penalty
    (about r once tau is calibrated); penalty rate is the share with it."""
    from sed_megatron.loss import get_kind

    mask = loss_mask.float()
    count = mask.sum()
    per_token = {"mask rate": 1.0 - stats["mask"], "penalty rate": stats["mask"]}
    per_token.update({report: stats[name] for name, report in STANDARD_REPORTS.items() if name in stats})
    per_token.update({f"{kind_name} {name}": stats[name] for name in get_kind(kind_name).reports})
    report = {"lm loss": torch.stack([loss_sum.detach().float(), count])}
    report.update({key: torch.stack([(value * mask).sum(), count]) for key, value in per_token.items()})
    return report


class MetricsLog:
    """metrics.jsonl: one JSON object per line Megatron logs (the caller decides which rank).

    Each record holds the means over the iterations since the previous record, as Megatron's log
    line does (its accumulators are reset after every line, the first included: see hooks.py),
    so the two agree; skipped iterations count in `skipped`, not in the means."""

    def __init__(self, path, tokens_per_iteration):
        self.path = path
        self.tokens_per_iteration = tokens_per_iteration
        self._sums, self._count, self._skipped = {}, 0, 0
        self._last = None  # (iteration, time) of the previous record, or of the start
        self._drop_after = None  # the start's iteration, until the first write
        self._annotation = {}  # fields of the next record only (a restart's account)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def start(self, iteration):
        """The loop starts after `iteration` finished ones: the first record's throughput counts from here.

        Records past `iteration` already in the file belong to a run this one replaces (a fresh run
        saving into the same directory, or a resume from an earlier checkpoint): the first write
        drops them, so that the file holds one curve."""
        self._last = (iteration, time.time())
        self._drop_after = iteration

    def annotate_next(self, fields):
        """Fields the next record carries besides the metrics (a restart's account: `restart`)."""
        self._annotation.update(fields)

    def _drop_records_after(self, iteration):
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["iteration"] <= iteration:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                    pass
        atomic_write_text(self.path, "".join(kept))

    def add(self, reduced, skipped):
        """One iteration's report (Megatron key -> value, reduced over micro-batches and DP)."""
        if skipped:
            self._skipped += 1
            return
        for key, value in reduced.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1

    def write(self, iteration, lr, grad_norm):
        now = time.time()
        record = {"iteration": int(iteration)}
        for report_key, total in self._sums.items():
            record[metrics_key(report_key)] = total / max(1, self._count)
        record["lr"] = float(lr) if lr is not None else None
        record["grad_norm"] = float(grad_norm) if grad_norm is not None else None
        record["tokens_per_sec"] = None
        if self._last is not None and iteration > self._last[0] and now > self._last[1]:
            record["tokens_per_sec"] = (iteration - self._last[0]) * self.tokens_per_iteration / (now - self._last[1])
        record["skipped"] = self._skipped
        record.update(self._annotation)
        self._annotation = {}
        self._sums, self._count, self._skipped = {}, 0, 0
        self._last = (iteration, now)
        if self._drop_after is not None:
            self._drop_records_after(self._drop_after)
            self._drop_after = None
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
