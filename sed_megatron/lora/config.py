"""What a LoRA run trains: rank, scaling, dropout and the target modules, by PEFT's names.

    cfg = LoRAConfig(rank=16, alpha=32, target_modules=parse_targets("q_proj,v_proj"))
    cfg.scaling                                  # alpha / rank (alpha / sqrt(rank) with use_rslora)

Targets are named as PEFT names them for Llama-like models; each belongs to one of Megatron's
fused linear layers, which gets one adapter per target (so q, k and v, and gate and up, keep
adapters of their own and the export to PEFT is exact):

    q_proj, k_proj, v_proj -> self_attention.linear_qkv (column parallel)
    o_proj                 -> self_attention.linear_proj (row parallel)
    gate_proj, up_proj     -> mlp.linear_fc1 (column parallel; up_proj alone without SwiGLU)
    down_proj              -> mlp.linear_fc2 (row parallel)

`all-linear` is all seven. The MLP targets apply to dense layers; an MoE layer's experts and
router keep no adapter (its attention does).
"""

import json
import math
import os
from dataclasses import dataclass

PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
LINEAR_OF_TARGET = {"q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv", "o_proj": "linear_proj",
                    "gate_proj": "linear_fc1", "up_proj": "linear_fc1", "down_proj": "linear_fc2"}
"""PEFT target -> the Megatron linear layer (attribute of the attention or MLP module) it adapts."""
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
"""Linear layers whose output features are split by TP (the others' input features are)."""


def parse_targets(value):
    """PEFT target modules from a comma-separated string or a list: a tuple in PEFT_TARGETS order.
    ValueError naming an unknown one."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(name).strip() for name in names if str(name).strip()]
    if names == [ALL_LINEAR]:
        return PEFT_TARGETS
    unknown = [name for name in names if name not in PEFT_TARGETS]
    if unknown or not names:
        raise ValueError(f"unknown target module {unknown[0] if unknown else '(none given)'!r} "
                         f"(known: {', '.join(PEFT_TARGETS)}, or {ALL_LINEAR})")
    return tuple(name for name in PEFT_TARGETS if name in names)


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters: delta W = scaling * B A, B [out, rank] and A [rank, in]."""

    rank: int
    """r: the adapters' inner width (> 0)."""
    alpha: float
    """lora_alpha: scaling = alpha / rank (alpha / sqrt(rank) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on each adapter's input (training only)."""
    target_modules: tuple = PEFT_TARGETS
    """PEFT names of the adapted projections (parse_targets)."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(rank)."""
    init_seed: int = 0
    """Seed of A's initialization: the same adapters whatever the parallel layout."""

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank: must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha: must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout: must lie in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "target_modules", parse_targets(self.target_modules))

    @property
    def scaling(self):
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def targets_of(self, linear):
        """The targets that adapt the Megatron linear layer `linear` (e.g. linear_qkv -> (q_proj, v_proj))."""
        return tuple(t for t in self.target_modules if LINEAR_OF_TARGET[t] == linear)

    def to_dict(self):
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules), "use_rslora": self.use_rslora}


LORA_FILE = "sed_megatron_lora.json"
"""Beside a checkpoint trained with LoRA: its LoRAConfig and the base checkpoint it started from."""


def write_lora_file(directory, cfg, base):
    from sed_megatron.utils import atomic_write_text

    os.makedirs(directory, exist_ok=True)
    atomic_write_text(os.path.join(directory, LORA_FILE), json.dumps({**cfg.to_dict(), "base": base}, indent=2))


def read_lora_file(directory):
    """(LoRAConfig, base checkpoint path) of a checkpoint directory trained with LoRA, or None.
    ValueError naming the file when it cannot be read."""
    path = os.path.join(directory or "", LORA_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            fields = json.load(f)
        base = fields.pop("base", None)
        return LoRAConfig(**fields), base
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a LoRA description ({err})") from None
