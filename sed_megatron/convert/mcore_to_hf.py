"""Megatron checkpoint (converted or trained, any TP x PP) -> Hugging Face directory.

    convert_mcore_to_hf("ckpt/llama32-3b-sed", "hf/llama32-3b-sed", hf_template="Llama-3.2-3B-Instruct")

Reads the checkpoint one decoder layer at a time (each parameter as its region of the stored
tensors, whatever TP x PP wrote them), maps the weights back with the family's name map (the
per-group QKV split, gate/up split, padding rows dropped, tied embeddings left tied) and
writes safetensors shards as they fill, with an index and a config.json (whose
`architectures` names the family's transformers class): memory stays near one shard plus one
layer. With hf_template, the tokenizer and generation files are copied from it and its
special-token ids are kept. The output loads with transformers.AutoModelForCausalLM.

A checkpoint trained with LoRA (a sed_megatron_lora.json beside it, naming the base checkpoint
the weights are read from) exports merged (each delta scaling B A written into its base weight,
in fp32, then cast), or with adapter_only=True
as a PEFT adapter directory (adapter_config.json, adapter_model.safetensors: only the adapters
are read) that peft.PeftModel.from_pretrained loads on the exported base.

The architecture comes from the checkpoint's sed_megatron_model.yaml. Bad input is a
ValueError with one line naming the file, and nothing is left at `save`.
"""

import os

from sed_megatron.lora import LORA_FILE, apply_lora, read_lora_file
from sed_megatron.lora.checkpoint import base_checkpoint_dir
from sed_megatron.lora.peft import (
    ADAPTER_WEIGHTS,
    adapted_targets,
    is_adapter_key,
    merge_layer,
    peft_tensors,
    write_adapter_config,
)
from sed_megatron.models import build_gpt_model, family_for
from sed_megatron.models.mapping import megatron_to_hf
from sed_megatron.models.model_file import MODEL_FILE, model_config_from_file
from sed_megatron.runtime.mcore import checkpoint_iteration_dir
from sed_megatron.utils import UsageError
from sed_megatron.world import single_process_model_parallel

from .checkpoint import ShardWriter, check_output_dir, staged_output
from .hf_files import write_hf_files
from .hf_to_mcore import DTYPES, Converted


def convert_mcore_to_hf(load, save, hf_template=None, dtype="auto", max_shard_size_mb=5000, overwrite=False,
                        progress=True, adapter_only=False, iteration=None):
    """Export the Megatron checkpoint at load as a Hugging Face directory at save; returns Converted.

    dtype: auto (the dtype it was converted with), bfloat16, float16 or float32.
    max_shard_size_mb: the largest safetensors shard (a larger single tensor gets its own).
    adapter_only: a LoRA checkpoint's adapters as a PEFT adapter directory.
    iteration: that iteration's checkpoint in load (default: the newest, which its tracker names)."""
    import torch
    from tqdm import tqdm

    from .streaming import layer_groups, load_group

    # The stored keys are the same for Transformer Engine and local layers: read through the local model.
    loaded = model_config_from_file(load, transformer_impl="local")
    if loaded is None:
        raise UsageError(f"{load}: no {MODEL_FILE} (a checkpoint converted with tools/convert_hf_to_mcore.py, "
                         f"or trained from one)")
    model_cfg, stored_dtype = loaded
    lora = read_lora_file(load)
    if adapter_only and lora is None:
        raise UsageError(f"{load}: no {LORA_FILE}: --adapter-only exports the adapters of a run trained with "
                         f"--lora-rank")
    family = family_for(model_cfg.model_type)
    check_output_dir(save, overwrite)
    if hf_template and not os.path.exists(os.path.join(hf_template, "config.json")):
        raise UsageError(f"{hf_template}: no config.json (--hf-template must be a Hugging Face model directory)")
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if max_shard_size_mb < 1:
        raise UsageError(f"max_shard_size_mb: expected at least 1, got {max_shard_size_mb}")
    dtype_name = stored_dtype if dtype == "auto" else dtype
    checkpoint_dir = checkpoint_iteration_dir(load, iteration)
    hf_config = family.hf_config(model_cfg, dtype=dtype_name)
    hf_config.architectures = [family.architecture]  # vLLM and SGLang pick their model class by it
    rows = family.rows(model_cfg)

    with single_process_model_parallel(), staged_output(save) as tmp_dir:  # nothing at `save` unless all succeeds
        with torch.device("meta"):
            model = build_gpt_model(model_cfg, model_cfg.transformer_config(perform_initialization=False))
            if lora is not None:
                apply_lora(model, lora[0])
        os.makedirs(tmp_dir)
        groups = layer_groups(model.sharded_state_dict())
        if adapter_only:
            count = _write_adapter(groups, checkpoint_dir, getattr(torch, dtype_name), tmp_dir, lora,
                                   hf_template or lora[1])
            return Converted(save, model_cfg, dtype_name, count, ())
        writer = ShardWriter(tmp_dir, max_shard_size_mb * 2**20)
        done = set()
        base_dir = checkpoint_dir if lora is None else checkpoint_iteration_dir(base_checkpoint_dir(load, lora[1]))
        for group in tqdm(groups, desc="export", unit=" layers", disable=not progress):
            # one decoder layer: the base's tensors (from the base checkpoint of a LoRA run) and the adapters
            base = {name: sh for name, sh in group.items() if not is_adapter_key(name)}
            tensors = load_group(base, base_dir, getattr(torch, dtype_name))
            if lora is not None:
                adapters = {name: sh for name, sh in group.items() if is_adapter_key(name)}
                tensors.update(load_group(adapters, checkpoint_dir, getattr(torch, dtype_name)) if adapters else {})
                merge_layer(tensors, model_cfg, lora[0])
            for name, tensor in megatron_to_hf(tensors.__getitem__, model_cfg, rows, only=tensors):
                writer.add(name, tensor)
            done.update(tensors)
        missing = [row.megatron for row in rows if row.megatron not in done]
        if missing:
            raise UsageError(f"{checkpoint_dir}: no {missing[0]} in the checkpoint (and {len(missing) - 1} more)")
        count = writer.close()
        notes = write_hf_files(tmp_dir, hf_config, hf_template)
    return Converted(save, model_cfg, dtype_name, count, tuple(notes))


def _write_adapter(groups, checkpoint_dir, dtype, directory, lora, base_model_name_or_path):
    """The adapters of every layer (only they are read) as PEFT's adapter files; the tensor count."""
    from safetensors.torch import save_file

    from .streaming import load_group

    tensors = {}
    for group in groups:
        adapters = {name: sh for name, sh in group.items() if is_adapter_key(name)}
        if adapters:
            tensors.update(load_group(adapters, checkpoint_dir, dtype))
    if not tensors:
        raise UsageError(f"{checkpoint_dir}: no LoRA adapters in the checkpoint")
    save_file(dict(peft_tensors(tensors)), os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_adapter_config(directory, lora[0], adapted_targets(tensors), base_model_name_or_path)
    return len(tensors)
