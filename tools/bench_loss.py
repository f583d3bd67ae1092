"""Forward+backward time and peak memory of the SFT token losses on one vocab shard.

    python tools/bench_loss.py                        # the table of docs/PERFORMANCE.md
    python tools/bench_loss.py --shapes 2048x76032 --dtypes bf16 --methods megatron_ce sed
    python tools/bench_loss.py --shapes 1x1024x76032 --methods sed gem sed_entropy   # [b, s, V/tp], b = 1
    python tools/bench_loss.py --rounds 7 --methods megatron_ce ce dft sed gem       # time only, methods in turns

Shapes: TOKENSxSHARD is logits [tokens, 1, V/tp] ([s, b] with b = 1); AxBxSHARD is logits
[A, B, V/tp] as written, so 1x1024x76032 is the trainer's [b, s, V/tp] at micro-batch 1.

Methods, each on the same [tokens, V/tp] logits shard and targets:
  megatron_ce    megatron.core.tensor_parallel.vocab_parallel_cross_entropy (the baseline)
  ce/dft/sed/gem sed_megatron.loss.sft_token_loss (inplace=True: Megatron's in-place convention)
  sed_copy       sft_token_loss without inplace (fp32 logits are copied, never overwritten)
  sed_entropy    sft_token_loss(..., with_entropy=True)
  published_sed  the published formulation: full fp32 softmax + topk + autograd
Each method runs in a fresh process (so allocator caches do not mix). Peak memory is the rise
of the peak above what the process held just before the call, inputs included in that
baseline: CUDA max_memory_allocated on a GPU, the resident set high-water mark on the CPU
(reset through /proc/self/clear_refs). Time is the median of --repeats calls after a warm-up.
--rounds N times only: one process, the methods take turns N rounds (each call on a fresh copy
of the same logits), and the table gives each method's median time and the median of its
round-by-round ratio to Megatron's CE: on a shared machine the load drifts over minutes, and
turns expose every method to the same drift.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from sed_megatron.testing.memory import PeakMemory
from sed_megatron.utils import ONE_PROCESS_WORLD

METHODS = ("megatron_ce", "ce", "dft", "sed", "gem", "sed_copy", "sed_entropy", "published_sed")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOP_K, TAU, LAM = 2, 0.6, 1.0


def _published_sed(logits, target):
    logits = logits.float()
    ce = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1), reduction="none")
    probs = torch.softmax(logits, dim=-1)
    p_target = probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        mask = (probs.topk(TOP_K, dim=-1).values.sum(-1) < TAU).float()
    return ce.view_as(target) + LAM * mask * (p_target * (p_target - 1) + 0.25)


def _loss_fn(method):
    if method == "megatron_ce":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return lambda logits, target: vocab_parallel_cross_entropy(logits, target, tp_group=torch.distributed.group.WORLD)
    if method == "published_sed":
        return _published_sed
    from sed_megatron.loss import LossConfig, sft_token_loss

    kind = method.split("_")[0]
    cfg = LossConfig(kind=kind, top_k=TOP_K, tau=TAU, lam=LAM)
    inplace, with_entropy = method != "sed_copy", method == "sed_entropy"
    return lambda logits, target: sft_token_loss(logits, target, cfg, inplace=inplace, with_entropy=with_entropy)[0]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _logits_shape(shape):
    """"TxV" -> (T, 1, V); "AxBxV" -> (A, B, V)."""
    dims = tuple(int(dim) for dim in shape.split("x"))
    if len(dims) == 2:
        return dims[0], 1, dims[1]
    if len(dims) == 3:
        return dims
    raise ValueError(f"bench_loss: shape {shape!r} is neither TOKENSxSHARD nor AxBxSHARD")


def run_one(method, shape, dtype_name, repeats, device):
    """Time and peak memory of one method in this process; returns a dict."""
    torch.manual_seed(0)
    dims = _logits_shape(shape)
    base = (torch.randn(*dims, device=device) * 3).to(DTYPES[dtype_name])
    target = torch.randint(0, dims[-1], dims[:-1], device=device)
    loss_fn = _loss_fn(method)

    def call():
        logits = base.clone().requires_grad_()  # in the baseline: Megatron overwrites fp32 input
        _sync(device)
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            loss = loss_fn(logits, target)
            (grad,) = torch.autograd.grad(loss.sum(), logits)
            _sync(device)
            elapsed = time.perf_counter() - start
            del loss, grad
        return elapsed, peak.rise

    call()  # warm-up
    results = [call() for _ in range(repeats)]
    return {
        "method": method,
        "shape": shape,
        "dtype": dtype_name,
        "time_s": statistics.median(r[0] for r in results),
        "peak_bytes": max(r[1] for r in results),
    }


def _child(args):
    device = torch.device(args.device)
    if args.method == "megatron_ce":
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", init_method=ONE_PROCESS_WORLD, rank=0, world_size=1
        )
    print(json.dumps(run_one(args.method, args.shape, args.dtype, args.repeats, device)))


def run_rounds(methods, shape, dtype_name, rounds, device):
    """{method: [seconds per round]}, the methods taking turns in this process."""
    torch.manual_seed(0)
    dims = _logits_shape(shape)
    base = (torch.randn(*dims, device=device) * 3).to(DTYPES[dtype_name])
    target = torch.randint(0, dims[-1], dims[:-1], device=device)
    loss_fns = {method: _loss_fn(method) for method in methods}
    times = {method: [] for method in methods}
    for _ in range(rounds + 1):  # the first round warms up
        for method in methods:
            logits = base.clone().requires_grad_()
            _sync(device)
            start = time.perf_counter()
            (grad,) = torch.autograd.grad(loss_fns[method](logits, target).sum(), logits)
            _sync(device)
            times[method].append(time.perf_counter() - start)
            del logits, grad
    return {method: values[1:] for method, values in times.items()}


def _print_rounds(shape, dtype, times):
    ref = times.get("megatron_ce")
    for method, values in times.items():
        ratio = f"{statistics.median(v / r for v, r in zip(values, ref)):.2f}" if ref else "-"
        print(f"| {shape} | {dtype} | {method} | {statistics.median(values) * 1e3:.0f} | {ratio} |")


def main():
    summary, commands, notes = __doc__.split("\n\n", 2)  # the notes after the options: those on the first screen
    parser = argparse.ArgumentParser(description=f"{summary}\n\n{commands}", epilog=notes,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["2048x76032", "2048x64128"], help="TOKENSxSHARD or AxBxSHARD")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, help="time only: the methods in turns in one process, ROUNDS rounds")
    args = parser.parse_args()
    if args.method:
        return _child(args)
    if args.rounds:
        device = torch.device(args.device)
        if "megatron_ce" in args.methods:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                                 init_method=ONE_PROCESS_WORLD)
        print("| logits shape | dtype | method | fwd+bwd ms (median) | time / Megatron CE (median of the rounds) |")
        print("|---|---|---|---:|---:|")
        for shape in args.shapes:
            for dtype in args.dtypes:
                _print_rounds(shape, dtype, run_rounds(args.methods, shape, dtype, args.rounds, device))
        return

    rows = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            for method in args.methods:
                cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--shape", shape,
                       "--dtype", dtype, "--repeats", str(args.repeats), "--device", args.device]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"bench_loss: {method} {shape} {dtype} failed:\n{out.stderr[-3000:]}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  {shape} {dtype} {method}: {rows[-1]['time_s']:.3f} s", file=sys.stderr, flush=True)
    _print_table(rows)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


def _print_table(rows):
    print("| logits shape | dtype | method | fwd+bwd ms | peak rise MiB | time / Megatron CE | peak / Megatron CE |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        ref = next(r for r in rows if r["shape"] == row["shape"] and r["dtype"] == row["dtype"] and r["method"] == "megatron_ce") \
            if any(r["method"] == "megatron_ce" for r in rows) else None
        time_ratio = f"{row['time_s'] / ref['time_s']:.2f}" if ref else "-"
        # Megatron's CE on fp32 logits works in the caller's tensor: its rise is ~0 and a ratio
        # to it says nothing; the absolute figures then speak.
        peak_ratio = f"{row['peak_bytes'] / ref['peak_bytes']:.2f}" if ref and ref["peak_bytes"] > 2**20 else "-"
        print(f"| {row['shape']} | {row['dtype']} | {row['method']} | {row['time_s'] * 1e3:.0f} | "
              f"{row['peak_bytes'] / 2**20:.0f} | {time_ratio} | {peak_ratio} |")


if __name__ == "__main__":
    main()
