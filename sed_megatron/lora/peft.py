"""LoRA adapters between Megatron's names and PEFT's, and merged into the base weights.

    merge_layer(tensors, model_cfg, cfg)            # a layer's Megatron tensors (TP=1): W += scaling B A, adapters removed
    for name, tensor in peft_tensors(tensors, cfg): # the same adapters as PEFT names them
    write_adapter_config(directory, cfg, targets, base_model_name_or_path)
    cfg, tensors = read_adapter(directory)          # a PEFT adapter directory: LoRAConfig, {Megatron name: tensor}

Megatron keys (model.py): `decoder.layers.{i}.self_attention.linear_qkv_lora.q_proj.lora_A`;
PEFT's, for a Llama-like *ForCausalLM: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`.
A PEFT adapter holds A [r, in] and B [out, r] per projection with the same meaning, so the
export is a renaming; merging writes each delta into the fused layer's rows as the name map
fuses the base weights (per query group for QKV, [gate; up] for fc1).
"""

import json
import os
import re

from sed_megatron.models.transforms import fuse_gate_up, fuse_qkv

from .config import LINEAR_OF_TARGET
from .model import ADAPTER_SUFFIX

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_OWNER = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp", "linear_fc2": "mlp"}
_HF_OWNER = {"self_attention": "self_attn", "mlp": "mlp"}
_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(self_attention|mlp)\.(linear_\w+?)" + ADAPTER_SUFFIX
                  + r"\.(\w+_proj)\.lora_([AB])$")


def is_adapter_key(name):
    return _KEY.match(name) is not None


def megatron_key(layer, target, which):
    """The Megatron (TP=1) name of one adapter matrix; which: "A" or "B"."""
    linear = LINEAR_OF_TARGET[target]
    return f"decoder.layers.{layer}.{_OWNER[linear]}.{linear}{ADAPTER_SUFFIX}.{target}.lora_{which}"


def peft_key(megatron_name):
    """PEFT's name of an adapter matrix (as PeftModel.save_pretrained writes it)."""
    layer, owner, _, target, which = _KEY.match(megatron_name).groups()
    return f"base_model.model.model.layers.{layer}.{_HF_OWNER[owner]}.{target}.lora_{which}.weight"


def megatron_key_of_peft(peft_name):
    """The inverse of peft_key; ValueError for a name that is no adapter of a supported projection."""
    match = re.match(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])"
                     r"(?:\.\w+)?\.weight$", peft_name)
    if match is None or match.group(3) not in LINEAR_OF_TARGET:
        raise ValueError(f"{peft_name}: not a LoRA matrix of q/k/v/o/gate/up/down_proj")
    layer, _, target, which = match.groups()
    return megatron_key(int(layer), target, which)


def adapted_targets(names):
    """The PEFT targets that have adapters among Megatron names (PEFT_TARGETS order)."""
    found = {_KEY.match(n).group(4) for n in names if _KEY.match(n)}
    return tuple(t for t in LINEAR_OF_TARGET if t in found)


def merge_layer(tensors, model_cfg, cfg):
    """Merge the adapters among `tensors` (Megatron names, TP=1 -> tensors) into their base
    weights in place (computed in fp32, stored in the base's dtype) and drop them."""
    import torch

    by_linear = {}
    for name in [n for n in tensors if is_adapter_key(n)]:
        layer, owner, linear, target, which = _KEY.match(name).groups()
        by_linear.setdefault((layer, owner, linear), {}).setdefault(target, {})[which] = tensors.pop(name)
    for (layer, owner, linear), targets in by_linear.items():
        weight_name = f"decoder.layers.{layer}.{owner}.{linear}.weight"
        base = tensors[weight_name]
        deltas = {t: (m["B"].float() @ m["A"].float()) * cfg.scaling for t, m in targets.items()}
        zeros = {}
        if linear == "linear_qkv":
            q_rows = model_cfg.num_attention_heads * model_cfg.kv_channels
            kv_rows = model_cfg.num_query_groups * model_cfg.kv_channels
            zeros = {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows}
        elif linear == "linear_fc1" and model_cfg.swiglu:
            zeros = {"gate_proj": model_cfg.ffn_hidden_size, "up_proj": model_cfg.ffn_hidden_size}
        full = {t: deltas.get(t, torch.zeros(rows, base.shape[1])) for t, rows in zeros.items()}
        if linear == "linear_qkv":
            delta = fuse_qkv(full["q_proj"], full["k_proj"], full["v_proj"], model_cfg.num_query_groups)
        elif full:
            delta = fuse_gate_up(full["gate_proj"], full["up_proj"])
        else:
            (delta,) = deltas.values()
        tensors[weight_name] = (base.float() + delta).to(base.dtype)
    return tensors


def peft_tensors(tensors, dtype=None):
    """(PEFT name, tensor) of every adapter matrix among `tensors` (Megatron names, TP=1)."""
    for name in sorted(n for n in tensors if is_adapter_key(n)):
        tensor = tensors[name]
        yield peft_key(name), (tensor if dtype is None else tensor.to(dtype)).contiguous()


def adapter_config(cfg, targets, base_model_name_or_path):
    """adapter_config.json as PEFT writes it for a causal LM."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "use_dora": False,
    }


def write_adapter_config(directory, cfg, targets, base_model_name_or_path):
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config(cfg, targets, base_model_name_or_path), f, indent=2)


_UNSUPPORTED = {"use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
                "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "fan_in_fan_out": False}
"""PEFT settings an adapter must leave at these values to be read (anything else is not plain LoRA on these projections)."""


def read_adapter(directory):
    """(LoRAConfig, {Megatron name: tensor}) of a PEFT LoRA adapter directory; ValueError (one line
    naming the file and field) for what it is not: another PEFT type, DoRA, per-module ranks, an
    adapter on another module."""
    from safetensors.torch import load_file

    from .config import LoRAConfig

    path = os.path.join(directory, ADAPTER_CONFIG)
    try:
        with open(path) as f:
            fields = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the adapter config ({err})") from None
    if fields.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {fields.get('peft_type')!r}: only LORA adapters are read")
    for field, plain in _UNSUPPORTED.items():
        value = fields.get(field, plain)
        if value != plain and not (plain in (None, {}, False) and not value):
            raise ValueError(f"{path}: {field}={fields[field]!r} is not supported (plain LoRA only: {field}={plain!r})")
    try:
        cfg = LoRAConfig(rank=fields["r"], alpha=float(fields["lora_alpha"]), dropout=float(fields.get("lora_dropout", 0)),
                         target_modules=fields["target_modules"], use_rslora=bool(fields.get("use_rslora", False)))
    except KeyError as err:
        raise ValueError(f"{path}: missing field {err.args[0]!r}") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.exists(weights):
        raise ValueError(f"{weights}: missing (only the safetensors format is read)")
    try:
        tensors = {megatron_key_of_peft(name): tensor for name, tensor in load_file(weights).items()}
    except ValueError as err:
        raise ValueError(f"{weights}: {err}") from None
    return cfg, tensors
