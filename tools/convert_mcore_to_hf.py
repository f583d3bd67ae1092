"""Megatron checkpoint (converted or trained, any TP x PP) -> Hugging Face directory.

    python tools/convert_mcore_to_hf.py --load CKPT_DIR --save HF_DIR [--hf-template HF_DIR] [--overwrite]

Loads the checkpoint at TP=1 PP=1 (Megatron reshards on load), maps the weights back (the
per-group QKV split, gate/up split, padding rows dropped, tied embeddings left tied), writes
sharded safetensors with an index and a config.json for the architecture. With --hf-template,
the tokenizer and generation files are copied from it and its special-token ids are kept.
The output loads with transformers.AutoModelForCausalLM.from_pretrained.
"""

import argparse
import functools
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROG = "convert_mcore_to_hf.py"
TEMPLATE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                  "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _fail(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _shards(tensors, max_bytes):
    """[(file name, {name: tensor})] in order, each under max_bytes unless one tensor is larger."""
    groups, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            groups.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    groups.append(current)
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    return [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]


def write_hf(directory, tensors, config, template, max_shard_bytes):
    from safetensors.torch import save_file

    os.makedirs(directory)
    shards = _shards(tensors, max_shard_bytes)
    for file_name, group in shards:
        save_file(group, os.path.join(directory, file_name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {name: file_name for file_name, group in shards for name in group}}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    if template:
        with open(os.path.join(template, "config.json")) as f:
            template_config = json.load(f)
        for key in SPECIAL_IDS:
            if key in template_config:
                setattr(config, key, template_config[key])
        for name in TEMPLATE_FILES:
            if os.path.exists(os.path.join(template, name)):
                shutil.copy(os.path.join(template, name), os.path.join(directory, name))
    config.save_pretrained(directory)


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--hf-template", default=None, help="Hugging Face directory for tokenizer and generation files")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                        help="auto: the dtype the checkpoint was converted with")
    parser.add_argument("--max-shard-size-mb", type=int, default=5000)
    parser.add_argument("--overwrite", action="store_true")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from sed_megatron.convert.checkpoint import check_output_dir, publish, read_model_file, single_process_env
    from sed_megatron.convert.llama import Layout, hf_config_from_flags, megatron_to_hf

    try:
        info = read_model_file(options.load)
        if info is None:
            raise ValueError(f"{options.load}: no sed_megatron_model.yaml (a checkpoint converted with "
                             f"tools/convert_hf_to_mcore.py, or trained from one)")
        check_output_dir(options.save, options.overwrite)
        if options.hf_template and not os.path.exists(os.path.join(options.hf_template, "config.json")):
            raise ValueError(f"{options.hf_template}: no config.json (--hf-template must be a Hugging Face model directory)")
    except ValueError as err:
        _fail(str(err))
    dtype_name = info.get("dtype", "float32") if options.dtype == "auto" else options.dtype

    try:
        single_process_env()
    except ValueError as err:
        _fail(str(err))

    import torch

    from sed_megatron.compat import apply_cpu_training_runtime
    from sed_megatron.training.setup import model_provider, parse_run_args

    on_cpu = apply_cpu_training_runtime()
    args, _ = parse_run_args(
        ["--load", options.load, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
         "--micro-batch-size", "1", "--global-batch-size", "1", "--seq-length", "16", "--train-iters", "1",
         "--finetune", "--no-load-optim", "--no-load-rng"],
        on_cpu, need_loss_config=False)
    from megatron.core.enums import ModelType
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import get_model

    initialize_megatron(allow_no_cuda=on_cpu)
    model = get_model(functools.partial(model_provider, args), ModelType.encoder_or_decoder, wrap_with_ddp=False)
    load_checkpoint(model, None, None)
    state = model[0].state_dict()
    layout = Layout.from_flags(info["model"], info["padded_vocab_size"],
                               te_names=args.transformer_impl == "transformer_engine")
    dtype = getattr(torch, dtype_name)
    tensors = {name: tensor.to("cpu", dtype) for name, tensor in megatron_to_hf(state.__getitem__, layout)}
    config = hf_config_from_flags(info["model"], info["model_type"], dtype=dtype_name)
    tmp_dir = f"{os.path.abspath(options.save.rstrip('/'))}.tmp-{os.getpid()}"
    try:
        write_hf(tmp_dir, tensors, config, options.hf_template, options.max_shard_size_mb * 2**20)
        publish(tmp_dir, options.save)
    finally:
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)
    print(f"saved {options.save} ({info['model_type']}, {dtype_name}, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
