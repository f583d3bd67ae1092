"""Training-step time with the SED loss vs cross-entropy on the same model and batch.

    python tools/bench_step.py                  # tiny and medium GPT, the table of docs/PERFORMANCE.md
    python tools/bench_step.py --sizes medium --steps 10

One process (gloo world of 1, or one GPU). A step = forward, loss, backward, Adam update of a
Megatron-Core GPTModel (local layers on CPU). Losses compared on identical inputs:
  megatron_ce  megatron.core.tensor_parallel.vocab_parallel_cross_entropy (a plain Megatron run)
  ce           sft_token_loss(kind="ce")
  sed          sft_token_loss(kind="sed", k=2, tau=0.6, lam=1)
The losses take turns step by step (after a warm-up), so drift in machine speed hits all alike;
the median step time of each is reported.
"""

import argparse
import os
import statistics
import time

import torch

SIZES = {  # name -> (layers, hidden, heads, ffn, vocab, seq, micro-batch)
    "tiny": (2, 64, 4, 128, 256, 64, 8),
    "medium": (4, 512, 8, 1408, 32000, 512, 2),
}
LOSSES = ("megatron_ce", "ce", "sed")


def build_model(layers, hidden, heads, ffn, vocab, seq, device):
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=ffn,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, masked_softmax_fusion=False, bias_activation_fusion=False,
    )
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=vocab,
                     max_sequence_length=seq, position_embedding_type="rope")
    return model.to(device)


def one_process_world():
    """A world of this one process (gloo on the CPU, NCCL on a GPU) with Megatron's parallel state; its device."""
    from megatron.core import parallel_state

    from sed_megatron.runtime import prepare
    from sed_megatron.utils import ONE_PROCESS_WORLD

    runtime = prepare(training=False)
    torch.distributed.init_process_group(runtime.backend, init_method=ONE_PROCESS_WORLD,
                                         rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    return torch.device(runtime.device)


def loss_fn(name):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from sed_megatron.loss import LossConfig, sft_token_loss

    group = parallel_state.get_tensor_model_parallel_group()
    if name == "megatron_ce":
        return lambda logits, labels: vocab_parallel_cross_entropy(logits, labels, tp_group=group)
    cfg = LossConfig(kind=name, top_k=2, tau=0.6, lam=1.0)
    return lambda logits, labels: sft_token_loss(logits, labels, cfg, group, inplace=True)[0]


def bench_size(size, steps, device):
    layers, hidden, heads, ffn, vocab, seq, batch = SIZES[size]
    model = build_model(layers, hidden, heads, ffn, vocab, seq, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    position_ids = torch.arange(seq, device=device).expand(batch, seq)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1).expand(batch, 1, seq, seq)
    fns = {name: loss_fn(name) for name in LOSSES}

    def step(name):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(tokens, position_ids, causal)  # [b, s, V]
        loss = fns[name](logits, labels).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for name in LOSSES:  # warm-up
        step(name)
    times = {name: [] for name in LOSSES}
    for _ in range(steps):
        for name in LOSSES:
            times[name].append(step(name))
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loss")
    args = parser.parse_args()

    device = one_process_world()
    print("| model | step ms: Megatron CE | ce | sed | sed / Megatron CE | sed / ce |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        t = bench_size(size, args.steps, device)
        layers, hidden, _, _, vocab, seq, batch = SIZES[size]
        label = f"{size}: {layers}L h{hidden} V{vocab} {batch}x{seq}"
        print(f"| {label} | {t['megatron_ce'] * 1e3:.1f} | {t['ce'] * 1e3:.1f} | {t['sed'] * 1e3:.1f} | "
              f"{t['sed'] / t['megatron_ce']:.3f} | {t['sed'] / t['ce']:.3f} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    main()
