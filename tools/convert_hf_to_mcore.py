"""Hugging Face Llama / Qwen2 / Mistral directory -> Megatron distributed checkpoint.

    python tools/convert_hf_to_mcore.py --hf-dir HF_DIR --save CKPT_DIR [--dtype bfloat16] [--overwrite]
    torchrun --nproc_per_node 2 -m sed_megatron.train --config run.yaml --load CKPT_DIR --finetune ...

Writes Megatron-LM's torch_dist checkpoint of a TP=1 model (training loads it at any TP x PP)
and `sed_megatron_model.yaml` with the architecture, which training reads from --load. The
dtype of the Hugging Face weights is kept unless --dtype says otherwise. Bad input (an
unsupported model_type, a missing or corrupt shard, a shape mismatch, a non-empty output
directory) stops with one line and leaves nothing at --save.
"""

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROG = "convert_hf_to_mcore.py"
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _fail(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_tokenizer_fits(hf_dir, vocab_size):
    """A tokenizer shipped with the model must not produce ids the embedding does not have."""
    if not any(os.path.exists(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(hf_dir))
    if size > vocab_size:
        raise ValueError(f"{hf_dir}/config.json: vocab_size {vocab_size} is smaller than the tokenizer's {size} tokens")


def megatron_argv(flags, save_dir, dtype_name):
    """Megatron-LM flags of a one-process TP=1 model of the architecture, saving to save_dir."""
    from megatron.training.arguments import add_megatron_arguments

    from sed_megatron.training.arguments import yaml_flags_to_argv

    parser = add_megatron_arguments(argparse.ArgumentParser())
    return yaml_flags_to_argv(flags, parser, "converted config") + [
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--micro-batch-size", "1",
        "--global-batch-size", "1", "--train-iters", "1", "--seq-length", str(min(flags["max_position_embeddings"], 4096)),
        "--save", save_dir, "--save-interval", "1", "--no-save-optim", "--no-save-rng", "--ckpt-format", "torch_dist",
    ] + {"bfloat16": ["--bf16"], "float16": ["--fp16"]}.get(dtype_name, [])


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the Hugging Face config's dtype")
    parser.add_argument("--overwrite", action="store_true")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)

    import torch
    import yaml
    from transformers import AutoConfig

    from sed_megatron.convert.checkpoint import (
        MODEL_FILE, HFTensors, check_output_dir, padded_vocab_size, single_process_env, staged_output,
    )
    from sed_megatron.convert.llama import Layout, megatron_flags_from_hf, name_map

    try:
        if not os.path.exists(os.path.join(options.hf_dir, "config.json")):
            raise ValueError(f"{options.hf_dir}: no config.json")
        try:
            hf_config = AutoConfig.from_pretrained(options.hf_dir)
        except (ValueError, KeyError) as err:  # an unknown model_type is a ValueError in transformers
            raise ValueError(f"{options.hf_dir}/config.json: {err}".splitlines()[0]) from None
        flags = megatron_flags_from_hf(hf_config)
        check_tokenizer_fits(options.hf_dir, hf_config.vocab_size)
        check_output_dir(options.save, options.overwrite)
        tensors = HFTensors(options.hf_dir)
    except ValueError as err:
        _fail(str(err))
    dtype_name = options.dtype
    if dtype_name == "auto":
        dtype_name = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32")
        dtype_name = dtype_name.replace("torch.", "")
    dtype = getattr(torch, dtype_name)

    try:
        single_process_env()
    except ValueError as err:
        _fail(str(err))
    from sed_megatron.runtime import prepare
    from sed_megatron.training.setup import model_provider, parse_run_args

    runtime = prepare(training=True)
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.initialize import initialize_megatron
    from tqdm import tqdm

    from sed_megatron.convert.streaming import StreamingSaveStrategy, chunk_sources

    with staged_output(options.save) as tmp_dir:  # nothing at --save unless everything succeeds
        args, _ = parse_run_args(megatron_argv(flags, tmp_dir, dtype_name), runtime, need_loss_config=False)
        initialize_megatron(allow_no_cuda=runtime.on_cpu)
        args.padded_vocab_size = padded_vocab_size(flags["vocab_size"])

        try:
            with torch.device("meta"):  # no memory, no random init: the weights come from the checkpoint
                model = model_provider(args).to(dtype)  # every tensor in the checkpoint's dtype, as training saves it
            sharded = model.sharded_state_dict()
            expected = {name: sh for name, sh in sharded.items() if not name.endswith("_extra_state")}
            layout = Layout.from_flags(flags, args.padded_vocab_size, te_names=args.transformer_impl == "transformer_engine")
            rows = {mcore: (hf_names, fuse) for mcore, hf_names, fuse, _ in name_map(layout)}
            for name, (hf_names, fuse) in rows.items():  # every shape checked before anything is written
                if name not in expected:
                    raise ValueError(f"converted tensor {name} has no place in the Megatron model")
                shape = tuple(fuse(*(tensors.meta(n) for n in hf_names)).shape)
                if shape != tuple(expected[name].data.shape):
                    raise ValueError(f"shape mismatch: {name} is {shape} from {options.hf_dir}, the model expects "
                                     f"{tuple(expected[name].data.shape)} (config.json disagrees with the weights)")
            absent = sorted(set(expected) - set(rows))
            if absent:
                raise ValueError(f"no Hugging Face tensor for {absent[0]} (and {len(absent) - 1} more)")

            sources = chunk_sources(sharded)
            progress = tqdm(total=len(sources), desc="convert", unit=" chunks")

            @functools.lru_cache(maxsize=1)  # a parameter saved as several chunks is converted once
            def converted(name):
                hf_names, fuse = rows[name]
                return fuse(*(tensors(n) for n in hf_names)).to(dtype)

            def materialize(key, offset):
                name, cut = sources[(key, offset)]
                progress.update()
                return cut(converted(name))

            strategy = StreamingSaveStrategy(materialize)
            save_checkpoint(0, [model], None, None, 0, checkpointing_context={"save_strategy": strategy})
            progress.close()
            with open(os.path.join(tmp_dir, MODEL_FILE), "w") as f:
                yaml.safe_dump({"model_type": hf_config.model_type, "model": flags,
                                "padded_vocab_size": args.padded_vocab_size, "dtype": dtype_name}, f, sort_keys=False)
        except ValueError as err:
            _fail(str(err))

    print(f"saved {options.save} ({hf_config.model_type}, {dtype_name}, padded vocab {args.padded_vocab_size})")


if __name__ == "__main__":
    main()
