"""LoRA on a GPTModel: adapters beside its linear layers, everything else frozen.

    added = apply_lora(model, cfg)        # after build, before Megatron wraps it (DDP, Float16Module)

Each decoder layer's attention (`linear_qkv`, `linear_proj`) and dense MLP (`linear_fc1`,
`linear_fc2`) get a LinearAdapters child named `<linear>_lora` (checkpoint keys such as
`decoder.layers.3.self_attention.linear_qkv_lora.q_proj.lora_A`) and a forward hook that adds
its delta to the layer's output, so the base layers, their weights and their checkpoint keys
stay Megatron's own. An MoE layer's experts and router keep no adapter. Every parameter that is
not an adapter's stops requiring a gradient: Megatron's DDP and optimizer then hold the
adapters only, and its linear layers take their frozen-weight path.
"""

import dataclasses

import torch

from .config import COLUMN_PARALLEL, LINEAR_OF_TARGET, PEFT_TARGETS
from .layers import LinearAdapters, group_rank_and_size

ADAPTER_SUFFIX = "_lora"


def linear_parts(linear, config):
    """{target: output features (TP=1)} and the input features (TP=1) of a Megatron linear layer."""
    heads, groups, head_dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    if linear == "linear_qkv":
        return {"q_proj": heads * head_dim, "k_proj": groups * head_dim, "v_proj": groups * head_dim}, hidden
    if linear == "linear_proj":
        return {"o_proj": hidden}, heads * head_dim
    if linear == "linear_fc1":
        return ({"gate_proj": ffn, "up_proj": ffn} if config.gated_linear_unit else {"up_proj": ffn}), hidden
    return {"down_proj": hidden}, ffn


def _layout(linear, config, tp_size):
    """deltas ({target: [..., local rows]}) -> the local output of the fused layer (zeros for targets left out)."""
    if linear == "linear_qkv":
        groups = config.num_query_groups // tp_size
        per_group = {"q_proj": config.num_attention_heads // config.num_query_groups * config.kv_channels,
                     "k_proj": config.kv_channels, "v_proj": config.kv_channels}

        def qkv(deltas):  # Megatron's rows: [q heads, k, v] of group 0, then of group 1, ...
            some = next(iter(deltas.values()))
            lead = some.shape[:-1]
            parts = [deltas[t].reshape(*lead, groups, n) if t in deltas else some.new_zeros(*lead, groups, n)
                     for t, n in per_group.items()]
            return torch.cat(parts, dim=-1).reshape(*lead, -1)

        return qkv
    if linear == "linear_fc1" and config.gated_linear_unit:
        rows = config.ffn_hidden_size // tp_size

        def gate_up(deltas):  # [gate rows; up rows] of this rank
            some = next(iter(deltas.values()))
            parts = [deltas[t] if t in deltas else some.new_zeros(*some.shape[:-1], rows) for t in ("gate_proj", "up_proj")]
            return torch.cat(parts, dim=-1)

        return gate_up
    return lambda deltas: next(iter(deltas.values()))


CHECKPOINT_PARTS = ("all", "base", "adapters")


def apply_lora(model, cfg, checkpoint="all"):
    """Adapters on the targeted linear layers of `model` (a GPTModel, one pipeline stage), the
    rest frozen; returns the LinearAdapters added. ValueError for a target the model lacks
    (all-linear: those it has).

    checkpoint: what the model's sharded state dict (what Megatron saves and loads) holds:
    "all", "base" (loading a base checkpoint, which has no adapters) or "adapters" (a LoRA
    run's checkpoints: the base stays where it was converted); set_checkpoint_parts changes it."""
    if "gate_proj" in cfg.target_modules and not model.config.gated_linear_unit:
        if cfg.target_modules != PEFT_TARGETS:
            raise ValueError("lora target gate_proj: the model's MLP has no gate (no SwiGLU); target up_proj")
        cfg = dataclasses.replace(cfg, target_modules=tuple(t for t in PEFT_TARGETS if t != "gate_proj"))
    added = []
    for layer in model.decoder.layers:
        owners = [(layer.self_attention, ("linear_qkv", "linear_proj"))]
        if not hasattr(layer.mlp, "router"):  # a dense MLP; an MoE layer's experts keep no adapter
            owners.append((layer.mlp, ("linear_fc1", "linear_fc2")))
        for owner, linears in owners:
            for linear_name in linears:
                targets = cfg.targets_of(linear_name)
                if not targets:
                    continue
                linear = getattr(owner, linear_name)
                parts, in_features = linear_parts(linear_name, model.config)
                _, tp_size = group_rank_and_size(getattr(linear, "tp_group", None))
                if hasattr(linear, "return_layernorm_output"):  # TE's fused norm: the hook needs the normed input
                    linear.return_layernorm_output = True
                    linear.return_layernorm_output_gathered = False
                adapters = LinearAdapters("column" if linear_name in COLUMN_PARALLEL else "row",
                                          {t: parts[t] for t in targets}, in_features,
                                          _layout(linear_name, model.config, tp_size), cfg,
                                          f"layer{layer.layer_number}", linear)
                owner.add_module(linear_name + ADAPTER_SUFFIX, adapters)
                linear.register_forward_hook(adapters.hook, with_kwargs=True)
                added.append(adapters)
    adapter_params = {id(p) for adapters in added for p in adapters.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in adapter_params)
    _filter_checkpoint(model, checkpoint)
    return added


def is_adapter_name(name):
    """Whether a state-dict or checkpoint key belongs to an adapter."""
    return ADAPTER_SUFFIX + "." in name


def _filter_checkpoint(model, parts):
    whole = model.sharded_state_dict

    def sharded_state_dict(*args, **kwargs):
        state = whole(*args, **kwargs)
        if model.lora_checkpoint_parts == "all":
            return state
        adapters = model.lora_checkpoint_parts == "adapters"
        return {key: value for key, value in state.items() if is_adapter_name(key) == adapters}

    model.sharded_state_dict = sharded_state_dict
    set_checkpoint_parts(model, parts)


def set_checkpoint_parts(model, parts):
    """What the sharded state dict of `model` (a GPTModel with adapters, any wrapping, or a list of
    chunks) holds from now on: "all", "base" or "adapters"."""
    if parts not in CHECKPOINT_PARTS:
        raise ValueError(f"checkpoint parts {parts!r}: expected one of {', '.join(CHECKPOINT_PARTS)}")
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):  # DDP, Float16Module
            chunk = chunk.module
        chunk.lora_checkpoint_parts = parts


def adapter_parameter_count(model_cfg, cfg):
    """Trainable parameters of LoRA on the whole model (every stage and rank): r (in + out) per
    adapted projection of each layer (attention only for an MoE model's MLP targets)."""
    from types import SimpleNamespace

    shape = SimpleNamespace(num_attention_heads=model_cfg.num_attention_heads, num_query_groups=model_cfg.num_query_groups,
                            kv_channels=model_cfg.kv_channels, hidden_size=model_cfg.hidden_size,
                            ffn_hidden_size=model_cfg.ffn_hidden_size, gated_linear_unit=model_cfg.swiglu)
    per_layer = 0
    for target in cfg.target_modules:
        linear = LINEAR_OF_TARGET[target]
        if linear in ("linear_fc1", "linear_fc2") and model_cfg.num_experts:
            continue
        parts, in_features = linear_parts(linear, shape)
        per_layer += cfg.rank * (in_features + parts[target])
    return per_layer * model_cfg.num_layers
