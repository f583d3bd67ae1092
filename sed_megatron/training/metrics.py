"""Per-token training metrics: what the loss function reports and how it lands in metrics.jsonl.

The loss function reports each metric as a `[sum, count]` pair over this micro-batch's loss
tokens; Megatron's loop adds the pairs over micro-batches and data-parallel ranks, so each
logged value is a token-weighted mean over the whole global batch.
"""

import json
import os
import time

import torch

# Report key (as Megatron logs it) -> metrics.jsonl key.
REPORT_KEYS = {
    "lm loss": "loss",
    "ce loss": "ce_loss",
    "sed penalty": "sed_penalty",
    "mask rate": "mask_rate",
    "topk mass": "topk_mass",
    "p target": "p_target",
    "token accuracy": "token_accuracy",
    "entropy": "entropy",
}


def token_metric_report(loss, stats, loss_mask, kind):
    """`[sum, count]` pairs of the objective and the stats over the loss tokens, detached."""
    mask = loss_mask.float()
    count = mask.sum()
    per_token = {
        "lm loss": loss.detach(),
        "ce loss": stats["ce"],
        "mask rate": stats["mask"],
        "topk mass": stats["topk_mass"],
        "p target": stats["p_target"],
        "token accuracy": stats["correct"],
    }
    if kind == "sed":
        per_token["sed penalty"] = loss.detach() - stats["ce"]  # lam * M * (p - 0.5)^2
    if "entropy" in stats:
        per_token["entropy"] = stats["entropy"]
    return {key: torch.stack([(value * mask).sum(), count]) for key, value in per_token.items()}


class MetricsLog:
    """Appends one JSON object per logged iteration to a file (the caller decides which rank)."""

    def __init__(self, path, tokens_per_iteration):
        self.path = path
        self.tokens_per_iteration = tokens_per_iteration
        self._last = None  # (iteration, time) of the previous record
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, iteration, reduced, lr, grad_norm, extra=None):
        """reduced: Megatron report key -> mean value for the logged interval."""
        now = time.time()
        record = {"iteration": int(iteration)}
        for report_key, key in REPORT_KEYS.items():
            if report_key in reduced:
                record[key] = float(reduced[report_key])
        record["lr"] = float(lr) if lr is not None else None
        record["grad_norm"] = float(grad_norm) if grad_norm is not None else None
        if self._last is not None and iteration > self._last[0] and now > self._last[1]:
            record["tokens_per_sec"] = (iteration - self._last[0]) * self.tokens_per_iteration / (now - self._last[1])
        else:
            record["tokens_per_sec"] = None  # the first record has no interval to measure
        record.update(extra or {})
        self._last = (iteration, now)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
