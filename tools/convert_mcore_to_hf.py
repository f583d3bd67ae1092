"""Megatron checkpoint (converted or trained, any TP x PP) -> Hugging Face directory.

    python tools/convert_mcore_to_hf.py --load CKPT_DIR --save HF_DIR [--hf-template HF_DIR] [--overwrite]

Reads the checkpoint one decoder layer at a time through Megatron's dist_checkpointing (which
reshards whatever TP x PP wrote it), maps the weights back (the per-group QKV split, gate/up
split, padding rows dropped, tied embeddings left tied) and writes safetensors shards as they
fill, with an index and a config.json for the architecture: memory stays near one shard plus
one layer. With --hf-template,
the tokenizer and generation files are copied from it and its special-token ids are kept.
The output loads with transformers.AutoModelForCausalLM.from_pretrained.
"""

import argparse
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


class ShardWriter:
    """safetensors shards of at most max_bytes (unless one tensor is larger), written as they fill."""

    def __init__(self, directory, max_bytes):
        self.directory, self.max_bytes = directory, max_bytes
        self.files, self.weight_map, self.total = [], {}, 0
        self._pending, self._size = {}, 0

    def add(self, name, tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._size + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = tensor
        self._size += nbytes
        self.total += nbytes

    def _flush(self):
        from safetensors.torch import save_file

        file_name = f"part-{len(self.files):05d}.safetensors"
        save_file(self._pending, os.path.join(self.directory, file_name), metadata={"format": "pt"})
        self.files.append((file_name, list(self._pending)))
        self._pending, self._size = {}, 0

    def close(self):
        """Name the shards as transformers expects and write the index; the number of tensors."""
        self._flush()
        count = len(self.files)
        for i, (file_name, names) in enumerate(self.files):
            final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.directory, file_name), os.path.join(self.directory, final))
            self.weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, f, indent=2)
        return len(self.weight_map)


def write_config(directory, config, template):
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

    from sed_megatron.convert.checkpoint import check_output_dir, read_model_file, single_process_env, staged_output
    from sed_megatron.convert.llama import Layout, hf_config_from_flags, megatron_to_hf, name_map

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

    from sed_megatron.runtime import prepare
    from sed_megatron.training.setup import model_provider, parse_run_args

    runtime = prepare(training=True)
    args, _ = parse_run_args(
        ["--load", options.load, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
         "--micro-batch-size", "1", "--global-batch-size", "1", "--seq-length", "16", "--train-iters", "1",
         "--finetune", "--no-load-optim", "--no-load-rng"],
        runtime, need_loss_config=False)
    from megatron.training.checkpointing import get_checkpoint_name, get_checkpoint_tracker_filename, read_metadata
    from megatron.training.initialize import initialize_megatron
    from tqdm import tqdm

    from sed_megatron.convert.streaming import layer_groups, load_group

    initialize_megatron(allow_no_cuda=runtime.on_cpu)
    tracker = get_checkpoint_tracker_filename(options.load)
    if not os.path.exists(tracker):
        _fail(f"{tracker}: missing (not a Megatron checkpoint directory)")
    iteration, release = read_metadata(tracker)
    checkpoint_dir = get_checkpoint_name(options.load, iteration, release, return_base_dir=True)
    with torch.device("meta"):
        model = model_provider(args)
    layout = Layout.from_flags(info["model"], info["padded_vocab_size"],
                               te_names=args.transformer_impl == "transformer_engine")
    dtype = getattr(torch, dtype_name)
    config = hf_config_from_flags(info["model"], info["model_type"], dtype=dtype_name)
    with staged_output(options.save) as tmp_dir:  # nothing at --save unless everything succeeds
        os.makedirs(tmp_dir)
        writer = ShardWriter(tmp_dir, options.max_shard_size_mb * 2**20)
        done = set()
        for group in tqdm(layer_groups(model.sharded_state_dict()), desc="export", unit=" layers"):
            loaded = load_group(group, checkpoint_dir, dtype)  # one decoder layer (or the global tensors)
            for name, tensor in megatron_to_hf(loaded.__getitem__, layout, only=loaded):
                writer.add(name, tensor)
            done.update(loaded)
        missing = [mcore for mcore, *_ in name_map(layout) if mcore not in done]
        if missing:
            _fail(f"{checkpoint_dir}: no {missing[0]} in the checkpoint (and {len(missing) - 1} more)")
        count = writer.close()
        write_config(tmp_dir, config, options.hf_template)
    print(f"saved {options.save} ({info['model_type']}, {dtype_name}, {count} tensors)")


if __name__ == "__main__":
    main()
