"""Hugging Face directory -> Megatron distributed checkpoint (and what training needs to load it).

    convert_hf_to_mcore("Llama-3.2-3B-Instruct", "ckpt/llama32-3b")     # or tools/convert_hf_to_mcore.py

The checkpoint is Megatron-LM's own (torch_dist, `iter_0000000`), written by its
save_checkpoint from a TP=1 model built on the meta device, so training loads it at any
TP x PP; each tensor is converted when the writer reaches it (memory stays near one tensor).
Beside it, `sed_megatron_model.yaml` (see checkpoint.py). The vocabulary is padded to a
multiple of 1024 rows, so the embedding splits evenly at any TP dividing 1024; the padding
rows are zero. The family (name map, layers) follows the config's model_type.

Bad input (an unsupported model_type, a missing or corrupt shard, a shape mismatch, a
non-empty output directory) is a ValueError with one line naming the file, and nothing is
left at `save`. The process becomes a one-process torch.distributed world with Megatron's
global state initialized: call it once per process (sed_megatron.launch.run_isolated).
"""

import functools
import os
from dataclasses import dataclass

from sed_megatron.lora import apply_lora, write_lora_file
from sed_megatron.models import ModelConfig, family_for
from sed_megatron.models.model_file import write_model_file
from sed_megatron.utils import UsageError

from ..world import flags_to_argv, megatron_args, megatron_parser, single_process_env
from .checkpoint import HFTensors, check_output_dir, staged_output

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Converted:
    """What a converter wrote."""

    path: str
    """The output directory."""
    model_cfg: ModelConfig
    """The architecture of the converted model."""
    dtype: str
    """Its weights' dtype (torch name)."""
    count: int
    """Tensors written (checkpoint chunks for the import, Hugging Face tensors for the export)."""
    notes: tuple = ()
    """What the export changed for the frameworks that read it (convert/hf_files.py), one line each."""


def ignored_hf_tensors(model_cfg, tensors):
    """Stored tensors that carry no weights of their own: RoPE buffers some checkpoints include,
    and a tied model's lm_head (a copy of the embedding)."""
    return [name for name in tensors
            if name.endswith("rotary_emb.inv_freq") or (model_cfg.tied_embeddings and name == "lm_head.weight")]


def check_every_tensor_maps(hf_dir, model_cfg, tensors):
    """Every tensor the family's name map needs is stored, and every stored one is used (one
    the name map does not know would silently vanish)."""
    used = {name for row in family_for(model_cfg.model_type).rows(model_cfg, stored=tensors) for name in row.hf}
    missing = sorted(used - set(tensors))
    if missing:
        raise UsageError(f"{hf_dir}: tensor {missing[0]} (and {len(missing) - 1} more) is missing from the checkpoint")
    unused = sorted(set(tensors) - used - set(ignored_hf_tensors(model_cfg, tensors)))
    if unused:
        raise UsageError(f"{hf_dir}: tensor {unused[0]} (and {len(unused) - 1} more) has no place in the "
                         f"{model_cfg.model_type} name map")


def read_hf_config(hf_dir):
    """The transformers config of a Hugging Face directory; ValueError naming config.json."""
    from transformers import AutoConfig

    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise UsageError(f"{hf_dir}: no config.json")
    try:
        return AutoConfig.from_pretrained(hf_dir)
    except (ValueError, KeyError, OSError) as err:  # an unknown model_type is a ValueError in transformers
        raise UsageError(f"{path}: {err}".splitlines()[0]) from None


def model_config_from_hf_dir(hf_dir):
    """(transformers config, ModelConfig) of a Hugging Face directory, by its family."""
    hf_config = read_hf_config(hf_dir)
    try:
        return hf_config, family_for(hf_config.model_type).config_from_hf(hf_config)
    except ValueError as err:
        raise UsageError(f"{os.path.join(hf_dir, 'config.json')}: {err}") from None


def check_tokenizer_fits(hf_dir, vocab_size):
    """A tokenizer shipped with the model must not produce ids the embedding does not have."""
    if not any(os.path.exists(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(hf_dir))
    if size > vocab_size:
        raise UsageError(f"{hf_dir}/config.json: vocab_size {vocab_size} is smaller than the tokenizer's {size} tokens")


def resolve_dtype(dtype, hf_config):
    """The torch dtype name to convert to: `dtype`, or the Hugging Face config's for "auto"."""
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    name = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32")
    return name.replace("torch.", "")


class SharedReads:
    """Reads Hugging Face tensors for the rows; one that several rows use (a stacked expert tensor,
    one row per expert) is read once and kept until its last row has taken it."""

    def __init__(self, tensors, rows):
        self._tensors, self._kept = tensors, {}
        self._uses = {}
        for row in rows:
            for name in row.hf:
                self._uses[name] = self._uses.get(name, 0) + 1

    def __call__(self, name):
        tensor = self._kept.pop(name, None)
        if tensor is None:
            tensor = self._tensors(name)
        self._uses[name] = self._uses.get(name, 1) - 1
        if self._uses[name] > 0:
            self._kept[name] = tensor
        return tensor


def megatron_argv(model_cfg, save_dir, dtype_name):
    """Megatron-LM flags of a one-process TP=1 model of the architecture, saving to save_dir."""
    return flags_to_argv(model_cfg.to_megatron_flags(), megatron_parser("convert_hf_to_mcore.py"),
                         "converted config") + [
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--micro-batch-size", "1",
        "--global-batch-size", "1", "--train-iters", "1",
        "--seq-length", str(min(model_cfg.max_position_embeddings, 4096)),
        "--save", save_dir, "--save-interval", "1", "--no-save-optim", "--no-save-rng", "--ckpt-format", "torch_dist",
    ] + {"bfloat16": ["--bf16"], "float16": ["--fp16"]}.get(dtype_name, [])


def convert_hf_to_mcore(hf_dir, save, dtype="auto", overwrite=False, progress=True, adapter=None):
    """Convert the Hugging Face model in hf_dir into a Megatron checkpoint at save; returns Converted.

    dtype: auto (the Hugging Face config's), bfloat16, float16 or float32.
    overwrite: replace a non-empty `save` (only once the conversion has succeeded).
    adapter: a PEFT LoRA adapter directory trained on hf_dir: a LoRA checkpoint (base and
    adapters, sed_megatron_lora.json) that training continues with --load and --lora-rank."""
    lora = None
    if adapter is not None:
        from sed_megatron.lora.peft import read_adapter

        lora = read_adapter(adapter)  # (LoRAConfig, {Megatron name: tensor})
    hf_config, model_cfg = model_config_from_hf_dir(hf_dir)
    check_tokenizer_fits(hf_dir, hf_config.vocab_size)
    check_output_dir(save, overwrite)
    tensors = HFTensors(hf_dir)
    check_every_tensor_maps(hf_dir, model_cfg, tensors)
    dtype_name = resolve_dtype(dtype, hf_config)
    single_process_env()

    import torch

    from sed_megatron.runtime import prepare

    runtime = prepare(training=True)  # the device check; on a machine without a GPU, Megatron's CPU layer
    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.initialize import initialize_megatron
    from tqdm import tqdm

    from sed_megatron.models import build_gpt_model

    from .streaming import StreamingSaveStrategy, chunk_sources

    torch_dtype = getattr(torch, dtype_name)
    with staged_output(save) as tmp_dir:  # nothing at `save` unless everything succeeds
        args = megatron_args(megatron_argv(model_cfg, tmp_dir, dtype_name), runtime, "convert_hf_to_mcore.py")
        initialize_megatron(allow_no_cuda=runtime.on_cpu)
        args.padded_vocab_size = model_cfg.padded_vocab_size  # saved with the checkpoint's args
        model_cfg = model_cfg.replace(transformer_impl=args.transformer_impl)  # TE names where TE builds the layers
        with torch.device("meta"):  # no memory, no random init: the weights come from the checkpoint
            model = build_gpt_model(model_cfg, core_transformer_config_from_args(args)).to(torch_dtype)
            if lora is not None:
                apply_lora(model, lora[0])
        sharded = model.sharded_state_dict()
        expected = {name: sh for name, sh in sharded.items() if not name.endswith("_extra_state")}
        if lora is not None:
            expected = _check_adapter(adapter, lora[1], expected)  # the base's tensors left to map
        rows = {row.megatron: row for row in family_for(model_cfg.model_type).rows(model_cfg, stored=tensors)}
        for name, row in rows.items():  # every shape checked before anything is written
            if name not in expected:
                raise UsageError(f"converted tensor {name} has no place in the Megatron model")
            shape = tuple(row.mapping.to_megatron(model_cfg, *(tensors.meta(n) for n in row.hf)).shape)
            if shape != tuple(expected[name].data.shape):
                raise UsageError(f"shape mismatch: {name} is {shape} from {hf_dir}, the model expects "
                                 f"{tuple(expected[name].data.shape)} (config.json disagrees with the weights)")
        absent = sorted(set(expected) - set(rows))
        if absent:
            raise UsageError(f"no Hugging Face tensor for {absent[0]} (and {len(absent) - 1} more)")

        sources = chunk_sources(sharded)
        bar = tqdm(total=len(sources), desc="convert", unit=" chunks", disable=not progress)

        read = SharedReads(tensors, rows.values())

        @functools.lru_cache(maxsize=1)  # a parameter saved as several chunks is converted once
        def converted(name):
            if lora is not None and name in lora[1]:
                return lora[1][name].to(torch_dtype)
            row = rows[name]
            return row.to_megatron(model_cfg, read).to(torch_dtype)

        def materialize(key, offset):
            name, cut = sources[(key, offset)]
            bar.update()
            return cut(converted(name))

        save_checkpoint(0, [model], None, None, 0,
                        checkpointing_context={"save_strategy": StreamingSaveStrategy(materialize)})
        bar.close()
        write_model_file(tmp_dir, model_cfg, dtype_name)
        if lora is not None:
            write_lora_file(tmp_dir, lora[0], base=os.path.abspath(save))  # the base is in it too
    return Converted(save, model_cfg, dtype_name, len(sources))


def _check_adapter(adapter, adapter_tensors, expected):
    """Every adapter matrix the model has, from the adapter, of its shape (and none it lacks);
    the expected tensors without them."""
    from sed_megatron.lora.peft import ADAPTER_WEIGHTS, is_adapter_key, peft_key

    where = os.path.join(adapter, ADAPTER_WEIGHTS)
    wanted = {name for name in expected if is_adapter_key(name)}
    for name in sorted(set(adapter_tensors) - wanted):
        raise UsageError(f"{where}: {peft_key(name)} has no place in the model (another layer count or targets)")
    for name in sorted(wanted):
        if name not in adapter_tensors:
            raise UsageError(f"{where}: no {peft_key(name)} (the adapter_config.json targets it)")
        shape, want = tuple(adapter_tensors[name].shape), tuple(expected[name].data.shape)
        if shape != want:
            raise UsageError(f"{where}: {peft_key(name)} is {shape}, the model expects {want} (another base model?)")
    return {name: sh for name, sh in expected.items() if name not in wanted}
