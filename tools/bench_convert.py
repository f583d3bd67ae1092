"""Peak memory of the converters (both directions) on a synthetic checkpoint of a given size.

    python tools/bench_convert.py --workdir /tmp/bench_convert                 # ~1.5B parameters, bf16
    python tools/bench_convert.py --workdir /tmp/bench_convert --layers 56     # ~2.8B: the same peak

Writes a random Llama-style checkpoint (bf16 safetensors in 1 GiB shards, generated one shard
at a time), then measures under /usr/bin/time -v the maximum resident set size of: reading
every tensor into memory at once (what a converter that holds the model needs at least), the
HF -> Megatron converter, and the Megatron -> HF converter back (1 GiB shards).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(directory, layers, hidden, ffn, heads, groups, vocab, shard_bytes):
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=groups, max_position_embeddings=4096,
        tie_word_embeddings=False, dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    os.makedirs(directory, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, size, index, largest = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, index, largest
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        largest = max(largest, size)
        shard, size = {}, 0

    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if shard and size + tensor.numel() * 2 > shard_bytes:
            flush()
        shard[name] = tensor
        size += tensor.numel() * 2
    flush()
    total = sum(torch.Size(s).numel() for s in shapes.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, f)
    config.save_pretrained(directory)
    return total, largest


def peak_rss(cmd):
    """Maximum resident set size (GiB) and wall time of a command, from /usr/bin/time -v."""
    start = time.time()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                         env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return kib * 1024 / 2**30, time.time() - start


IN_MEMORY = """
import sys
import megatron.core  # the same runtime as the converters
from sed_megatron.convert.checkpoint import HFTensors
hf = HFTensors(sys.argv[1])
state = {name: hf(name) for name in hf}
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=6144)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    hf_dir, ckpt, back = (os.path.join(args.workdir, name) for name in ("hf", "ckpt", "hf_back"))
    params, largest = make_checkpoint(hf_dir, args.layers, args.hidden, args.ffn, 16, 8, args.vocab, 2**30)
    tools = os.path.join(REPO, "tools")
    rows = [
        ("whole model in memory (any non-streaming converter's floor)",
         peak_rss([sys.executable, "-c", IN_MEMORY, hf_dir])),
        ("convert_hf_to_mcore.py", peak_rss([sys.executable, os.path.join(tools, "convert_hf_to_mcore.py"),
                                             "--hf-dir", hf_dir, "--save", ckpt, "--overwrite"])),
        ("convert_mcore_to_hf.py (1 GiB shards)",
         peak_rss([sys.executable, os.path.join(tools, "convert_mcore_to_hf.py"), "--load", ckpt, "--save", back,
                   "--max-shard-size-mb", "1024", "--overwrite"])),
    ]
    gib = 2**30
    print(f"parameters: {params / 1e9:.2f}B ({args.layers} layers); model: {params * 2 / gib:.2f} GiB bf16; "
          f"largest shard: {largest / gib:.2f} GiB")
    print("| step | peak RSS (GiB) | peak / model size | wall (s) |")
    print("|---|---:|---:|---:|")
    for name, (peak, wall) in rows:
        print(f"| {name} | {peak:.2f} | {peak / (params * 2 / gib):.2f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
