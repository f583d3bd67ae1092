"""The same tokens through transformers and through the converted Megatron model at TP=N.

    torchrun --nproc_per_node 2 tools/compare_hf_mcore.py --hf-dir HF_DIR --load CKPT_DIR --tp 2

Loads the Megatron checkpoint (architecture from its sed_megatron_model.yaml) at tensor
parallel size N, runs a seeded batch of random token ids, gathers the vocab-parallel logits,
drops the padding ids, and compares with the Hugging Face model's logits (fp32). The last
line is `max_abs_logit_diff=<float>`; the exit code is 0 only within --atol (default 1e-3
for an fp32 checkpoint, 0.5 for bf16/fp16, whose Megatron forward runs in that precision).
"""

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROG = "compare_hf_mcore.py"


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--load", required=True, help="Megatron checkpoint (converted or trained)")
    parser.add_argument("--tp", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    parser.add_argument("--atol", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from sed_megatron.runtime import prepare
    from sed_megatron.convert.checkpoint import read_model_file
    from sed_megatron.training.setup import fail, model_provider, parse_run_args

    try:
        info = read_model_file(options.load)
    except ValueError as err:
        fail(str(err), PROG)
    if info is None:
        fail(f"{options.load}: no sed_megatron_model.yaml (convert with tools/convert_hf_to_mcore.py)", PROG)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != options.tp:
        fail(f"--tp {options.tp} needs as many processes (torchrun --nproc_per_node {options.tp}), got {world_size}", PROG)
    precision = {"bfloat16": ["--bf16"], "float16": ["--fp16"]}.get(info.get("dtype"), [])
    atol = options.atol if options.atol is not None else (0.5 if precision else 1e-3)

    import torch
    import torch.distributed as dist

    runtime = prepare(training=True)
    args, _ = parse_run_args(
        ["--load", options.load, "--tensor-model-parallel-size", str(options.tp), "--micro-batch-size", "1",
         "--global-batch-size", "1", "--seq-length", str(options.seq_length), "--train-iters", "1",
         "--finetune", "--no-load-optim", "--no-load-rng", *precision],
        runtime, need_loss_config=False)
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import get_model

    initialize_megatron(allow_no_cuda=runtime.on_cpu)
    model = get_model(functools.partial(model_provider, args), ModelType.encoder_or_decoder, wrap_with_ddp=False)
    load_checkpoint(model, None, None)
    vocab_size = info["model"]["vocab_size"]
    device = next(model[0].parameters()).device
    gen = torch.Generator().manual_seed(options.seed)
    tokens = torch.randint(0, vocab_size, (options.batch_size, options.seq_length), generator=gen)
    b, s = tokens.shape
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s)
    with torch.no_grad():
        shard = model[0].eval()(tokens.to(device), torch.arange(s, device=device).expand(b, s), causal.to(device))
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(shard) for _ in range(options.tp)]
        dist.all_gather(parts, shard.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)[..., :vocab_size].float().cpu()

    verdict = torch.zeros(1, device=device)
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(options.hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = hf_model(tokens).logits
        diff = float((logits - expected).abs().max())
        print(f"max_abs_logit_diff={diff!r}", flush=True)
        verdict[0] = float(diff <= atol)
    dist.broadcast(verdict, src=0)
    dist.destroy_process_group()
    sys.exit(0 if verdict.item() == 1.0 else 1)


if __name__ == "__main__":
    main()
