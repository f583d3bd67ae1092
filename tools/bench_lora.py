"""LoRA vs full fine-tuning on the same model and batch: trainable parameters, optimizer state, step time.

    TORCHDYNAMO_DISABLE=1 python tools/bench_lora.py                    # medium GPT, rank 16, all-linear
    TORCHDYNAMO_DISABLE=1 python tools/bench_lora.py --sizes tiny medium --rank 8 --steps 10

One process (gloo world of 1, or one GPU). A step = forward, the SED loss, backward and an
Adam update (of every parameter for full fine-tuning, of the adapters for LoRA) of a
Megatron-Core GPTModel built as tools/bench_step.py builds it; the two take turns step by
step after a warm-up, and the median of each is reported. Optimizer state: the bytes of
Adam's moments after the first step (a Megatron run adds an fp32 main copy of each trainable
parameter in bf16 training: 12 B per parameter in all).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import SIZES, build_model, one_process_world  # noqa: E402  (the same models as the step benchmark)


def make_run(size, lora_rank, device):
    """(step function, trainable parameters, total parameters, optimizer) of one setting."""
    from sed_megatron.loss import LossConfig, sft_token_loss

    layers, hidden, heads, ffn, vocab, seq, batch = SIZES[size]
    model = build_model(layers, hidden, heads, ffn, vocab, seq, device)
    if lora_rank:
        from sed_megatron.lora import LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    position_ids = torch.arange(seq, device=device).expand(batch, seq)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1).expand(batch, 1, seq, seq)
    cfg = LossConfig(kind="sed", top_k=2, tau=0.6, lam=1.0)

    def step():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(tokens, position_ids, causal)
        sft_token_loss(logits, labels, cfg, inplace=True)[0].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step, sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters()), optimizer


def optimizer_bytes(optimizer):
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim() > 0)


def bench(size, rank, steps, device):
    runs = {"full": make_run(size, 0, device), "lora": make_run(size, rank, device)}
    for step, *_ in runs.values():  # warm-up (and Adam's state)
        step()
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, (step, *_) in runs.items():
            times[name].append(step())
    return {name: (statistics.median(times[name]), trainable, total, optimizer_bytes(opt))
            for name, (_, trainable, total, opt) in runs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["medium"], choices=list(SIZES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    args = parser.parse_args()

    device = one_process_world()
    print("| model | setting | trainable parameters | share | Adam moments MiB | step ms | step / full |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        result = bench(size, args.rank, args.steps, device)
        layers, hidden, _, _, vocab, seq, batch = SIZES[size]
        label = f"{size}: {layers}L h{hidden} V{vocab} {batch}x{seq}"
        for name, (seconds, trainable, total, state) in result.items():
            setting = "full" if name == "full" else f"LoRA r{args.rank} all-linear"
            print(f"| {label} | {setting} | {trainable:,} | {trainable / total:.2%} | {state / 2**20:.1f} | "
                  f"{seconds * 1e3:.1f} | {seconds / result['full'][0]:.3f} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    main()
