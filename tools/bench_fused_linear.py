"""Forward + backward of the output layer and the SFT loss: fused (chunked) vs materialized logits.

    python tools/bench_fused_linear.py                                  # the tables of docs/PERFORMANCE.md
    python tools/bench_fused_linear.py --shapes 8192x3584x76032 --dtypes fp32 --methods materialized fused_grad_in_forward
    python tools/bench_fused_linear.py --shapes 16384x3584x76032 32768x3584x76032 --dtypes bf16 --device cuda   # a GPU
    python tools/bench_fused_linear.py --shapes 1024x3584x76032 --dtypes fp32 --interleaved 3   # time only

Shapes are TOKENSxHIDDENxSHARD: hidden [TOKENS, 1, HIDDEN], an output-layer shard [SHARD, HIDDEN]
(8192x3584x76032: 8192 tokens of Qwen2.5-7B, whose 152064 ids make 76032 per rank at TP = 2).

Methods (the loss: --kind, SED by default, k = 2, tau = 0.6, lam = 1; loss_mask = 1 on every token):
  megatron_ce            Megatron's own path: logits = the output layer's GEMM in its dtype,
                         Megatron's vocab_parallel_cross_entropy (CE whatever --kind), backward.
  materialized           the same output layer, sft_token_loss(inplace=True) and the masked sum.
  fused_recompute        fused_linear_sft_loss(gradient_accumulation_fusion=True, grad_in_forward=False):
                         chunks of tokens, the logits recomputed in the backward (4 GEMMs).
  fused_grad_in_forward  the same with grad_in_forward=True (3 GEMMs; dL/dW straight into main_grad
                         in the forward, dL/dhidden held until the backward): the default.
The output layer of the first two is Megatron's: on a GPU its own autograd function
(linear_with_grad_accumulation_and_async_allreduce) with gradient-accumulation fusion where
apex's extension is installed; without it the layer returns a 16-bit weight gradient that is
added to the fp32 main_grad, as Megatron's DDP does (the bf16 GEMM plus one add: Megatron's
bf16 path, never an fp32 GEMM over bf16 data). On the CPU a stand-in with the same GEMMs:
fp32 GEMMs into main_grad, and in bf16 fp32 GEMMs over blocks of vocabulary rows (PyTorch's CPU
bf16 GEMM with the vocabulary as inner dim runs at ~0.2 GFLOP/s; the fused path does the same there).
--chunk-size overrides the fused methods' default chunk (chunks.fused_chunk_tokens).

Each (shape, dtype, method) runs in a fresh process. The baseline already holds the inputs, the
weight and its fp32 main_grad (Megatron allocates its gradient buffers up front; it is zeroed,
so its pages are resident). Peak = the rise of the peak above that baseline during the call:
the resident-set high-water mark on the CPU (reset through /proc/self/clear_refs), CUDA's
max_memory_allocated on a GPU. Time = the median of --repeats calls after --warmup calls, wall
and process CPU time (all threads): on a shared machine the CPU time is the steadier figure; on
a GPU the wall time is the one that counts.
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

METHODS = ("megatron_ce", "materialized", "fused_recompute", "fused_grad_in_forward")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOP_K, TAU, LAM = 2, 0.6, 1.0
WGRAD_BLOCK_ELEMENTS = 1 << 24
"""Materialized bf16 on the CPU: vocab rows per block of the fp32 weight-gradient GEMM, as an element budget."""


class _CpuOutputLayer(torch.autograd.Function):
    """The CPU stand-in for Megatron's ColumnParallelLinear on one rank with gradient-accumulation
    fusion: logits = hidden W^T; backward dL/dhidden = G W and main_grad += G^T hidden (returns no
    weight gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(hidden, weight)
        return hidden @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        main_grad = weight.main_grad
        if grad.dtype == main_grad.dtype:
            main_grad.addmm_(grad.t(), hidden)
            return grad @ weight, None
        # bf16 on the CPU: both GEMMs in fp32 over blocks of vocabulary rows, as the fused path
        # does there (block-sized casts, nothing of the weight's size).
        hidden32 = hidden.float()
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        rows = max(1, WGRAD_BLOCK_ELEMENTS // max(grad.size(0), weight.size(1)))  # G's and W's blocks
        for start in range(0, grad.size(1), rows):
            block = slice(start, start + rows)
            grad_block = grad[:, block].float()
            main_grad[block].addmm_(grad_block.t(), hidden32)
            grad_hidden.addmm_(grad_block, weight[block].float())
        return grad_hidden.to(hidden.dtype), None


def _megatron_output_layer(hidden, weight):
    """logits [t, V/tp] from Megatron's output-layer function (a GPU), its weight gradient into main_grad."""
    from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce

    from sed_megatron.loss.fused_linear import _apex_wgrad_accumulate

    fusion = _apex_wgrad_accumulate() is not None and weight.main_grad.dtype == torch.float32
    weight.grad_added_to_main_grad = False
    if not fusion and not hasattr(weight, "_bench_hook"):  # Megatron's DDP: main_grad += the 16-bit gradient
        def add_to_main_grad(param):
            if not param.grad_added_to_main_grad:
                param.main_grad.add_(param.grad)
            param.grad = None
        weight._bench_hook = weight.register_post_accumulate_grad_hook(add_to_main_grad)
    return linear_with_grad_accumulation_and_async_allreduce(
        hidden, weight, None, gradient_accumulation_fusion=fusion, allreduce_dgrad=False, sequence_parallel=False,
        tp_group=torch.distributed.group.WORLD)


def _loss_fn(method, chunk_size, kind):
    from sed_megatron.loss import LossConfig, fused_linear_sft_loss, masked_sum_and_count, sft_token_loss

    cfg = LossConfig(kind=kind, top_k=TOP_K, tau=TAU if kind == "sed" else None, lam=LAM)
    if method in ("megatron_ce", "materialized"):
        def materialized(hidden, weight, target, loss_mask):
            flat = hidden.view(-1, hidden.size(-1))
            logits = (_megatron_output_layer(flat, weight) if weight.is_cuda else _CpuOutputLayer.apply(flat, weight))
            logits = logits.view(*target.shape, -1)
            if method == "megatron_ce":
                from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

                loss = vocab_parallel_cross_entropy(logits, target, tp_group=torch.distributed.group.WORLD)
            else:
                loss, _ = sft_token_loss(logits, target, cfg, inplace=True)
            del logits  # as in Megatron's step: the loss function consumes the model's output
            return masked_sum_and_count(loss, loss_mask)[0]
        return materialized

    def fused(hidden, weight, target, loss_mask):
        return fused_linear_sft_loss(hidden, weight, target, loss_mask, cfg, chunk_size=chunk_size,
                                     gradient_accumulation_fusion=True,
                                     grad_in_forward=method == "fused_grad_in_forward")[0]
    return fused


def _parse_shape(shape):
    dims = tuple(int(dim) for dim in shape.split("x"))
    if len(dims) != 3:
        raise ValueError(f"bench_fused_linear: shape {shape!r} is not TOKENSxHIDDENxSHARD")
    return dims


def run_one(method, shape, dtype_name, repeats, warmup, chunk_size, device, kind="sed"):
    """Time and peak memory of one method in this process; returns a dict."""
    tokens, hidden_size, shard = _parse_shape(shape)
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, 1, hidden_size, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(shard, hidden_size, generator=gen, device=device) * 0.02).to(dtype).requires_grad_()
    weight.main_grad = torch.empty(shard, hidden_size, dtype=torch.float32, device=device).zero_()  # resident
    target = torch.randint(0, shard, (tokens, 1), generator=gen, device=device)
    loss_mask = torch.ones(tokens, 1, device=device)
    loss_fn = _loss_fn(method, chunk_size, kind)

    def call():
        hidden.grad = None
        weight.main_grad.zero_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        with PeakMemory(device) as peak:
            start, start_cpu = time.perf_counter(), time.process_time()
            loss_sum = loss_fn(hidden, weight, target, loss_mask)
            loss_sum.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            del loss_sum
        assert hidden.grad is not None and hidden.grad.shape == hidden.shape
        return elapsed, peak.rise, float(weight.main_grad.double().norm()), cpu

    for _ in range(warmup):
        call()
    results = [call() for _ in range(repeats)]
    return {
        "method": method, "shape": shape, "dtype": dtype_name, "chunk_size": chunk_size, "kind": kind,
        "device": device.type,
        "time_s": statistics.median(r[0] for r in results),
        "times_s": [r[0] for r in results],
        "cpu_s": statistics.median(r[3] for r in results),
        "peak_bytes": max(r[1] for r in results),
        "main_grad_norm": results[-1][2],
    }


def _child(args):
    device = torch.device(args.device)
    if args.method == "megatron_ce" or (args.method == "materialized" and device.type == "cuda"):
        from sed_megatron.utils import ONE_PROCESS_WORLD

        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                             init_method=ONE_PROCESS_WORLD)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    row = run_one(args.method, args.shape, args.dtype, args.repeats, args.warmup, args.chunk_size, device, args.kind)
    print(json.dumps(row))


def run_interleaved(methods, shape, dtype_name, rounds, chunk_size, device, kind="sed"):
    """CPU time of each method, the methods taking turns in one process for `rounds` rounds.

    On a machine shared with other jobs the load drifts over minutes; turns expose every method
    to the same drift. Returns {method: [CPU seconds per round]} (no memory figure: the methods
    share an allocator here).
    """
    tokens, hidden_size, shard = _parse_shape(shape)
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, 1, hidden_size, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(shard, hidden_size, generator=gen, device=device) * 0.02).to(dtype).requires_grad_()
    weight.main_grad = torch.zeros(shard, hidden_size, dtype=torch.float32, device=device)
    target = torch.randint(0, shard, (tokens, 1), generator=gen, device=device)
    loss_mask = torch.ones(tokens, 1, device=device)
    loss_fns = {method: _loss_fn(method, chunk_size, kind) for method in methods}
    times = {method: [] for method in methods}
    for _ in range(rounds):
        for method in methods:
            hidden.grad = None
            start = time.process_time()
            loss_fns[method](hidden, weight, target, loss_mask).backward()
            times[method].append(time.process_time() - start)
            print(f"  {shape} {dtype_name} {method}: {times[method][-1]:.1f} s CPU", file=sys.stderr, flush=True)
    return times


def main():
    summary, commands, notes = __doc__.split("\n\n", 2)  # the notes after the options: those on the first screen
    parser = argparse.ArgumentParser(description=f"{summary}\n\n{commands}", epilog=notes,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["2048x3584x76032", "8192x3584x76032"],
                        help="TOKENSxHIDDENxSHARD")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk of the fused methods")
    parser.add_argument("--kind", default="sed", choices=["ce", "dft", "sed", "gem"], help="the loss (megatron_ce: CE)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--interleaved", type=int, metavar="ROUNDS",
                        help="time only: the methods take turns in one process, ROUNDS rounds per shape and dtype")
    parser.add_argument("--json", help="also write the rows to this file (rewritten after each row)")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return _child(args)
    if args.interleaved:
        results = []
        for shape in args.shapes:
            for dtype in args.dtypes:
                times = run_interleaved(args.methods, shape, dtype, args.interleaved, args.chunk_size,
                                        torch.device(args.device), args.kind)
                results.append({"shape": shape, "dtype": dtype, "cpu_s": times})
                if args.json:
                    with open(args.json, "w") as out_file:
                        json.dump(results, out_file, indent=1)
        print("| tokens x hidden x shard | dtype | method | CPU s per round | median / materialized |")
        print("|---|---|---|---|---:|")
        for result in results:
            ref = statistics.median(result["cpu_s"]["materialized"]) if "materialized" in result["cpu_s"] else None
            for method, values in result["cpu_s"].items():
                ratio = f"{statistics.median(values) / ref:.2f}" if ref else "-"
                print(f"| {result['shape']} | {result['dtype']} | {method} | "
                      f"{', '.join(f'{v:.1f}' for v in values)} | {ratio} |")
        return

    rows = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            for method in args.methods:
                cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--shape", shape,
                       "--dtype", dtype, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                       "--device", args.device, "--kind", args.kind]
                if args.chunk_size is not None:
                    cmd += ["--chunk-size", str(args.chunk_size)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"bench_fused_linear: {method} {shape} {dtype} failed:\n{out.stderr[-3000:]}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  {shape} {dtype} {method}: {rows[-1]['time_s']:.3f} s ({rows[-1]['cpu_s']:.1f} s CPU), "
                      f"{rows[-1]['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
                if args.json:
                    with open(args.json, "w") as out_file:
                        json.dump(rows, out_file, indent=1)
    _print_table(rows)


def _print_table(rows):
    """Ratios against Megatron's own path where it ran, else the materialized one; the time is the
    wall time on a GPU, the process CPU time on the CPU (the steadier figure on a shared machine)."""
    print("| tokens x hidden x shard | dtype | method | fwd+bwd s (wall) | CPU s | peak rise MiB | "
          "time / baseline | peak / baseline |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        same = [r for r in rows if r["shape"] == row["shape"] and r["dtype"] == row["dtype"]]
        ref = next((r for name in ("megatron_ce", "materialized") for r in same if r["method"] == name), None)
        key = "time_s" if row.get("device") == "cuda" else "cpu_s"
        time_ratio = f"{row[key] / ref[key]:.2f}" if ref else "-"
        peak_ratio = f"{row['peak_bytes'] / ref['peak_bytes']:.3f}" if ref and ref["peak_bytes"] > 0 else "-"
        print(f"| {row['shape']} | {row['dtype']} | {row['method']} | {row['time_s']:.3f} | {row['cpu_s']:.1f} | "
              f"{row['peak_bytes'] / 2**20:.0f} | {time_ratio} | {peak_ratio} |")


if __name__ == "__main__":
    main()
