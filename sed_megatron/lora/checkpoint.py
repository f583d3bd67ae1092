"""A LoRA run's checkpoints hold the adapters; the base weights stay in the checkpoint they came from.

    load_base(model, base_dir)     # the base weights of one stage, from a Megatron checkpoint, at any TP x PP

sed_megatron_lora.json beside each LoRA checkpoint (config.py) names that base checkpoint (a
converted or trained Megatron checkpoint; an imported PEFT adapter's checkpoint holds its base
itself and names itself). Resuming, exporting or comparing reads the base from there and the
adapters from the LoRA checkpoint.
"""

import os

from sed_megatron.runtime.mcore import checkpoint_iteration_dir
from sed_megatron.utils import UsageError

from .model import is_adapter_name, set_checkpoint_parts


def base_checkpoint_dir(lora_dir, base):
    """The base checkpoint a LoRA checkpoint names, checked: UsageError naming the LoRA file when it is gone."""
    from .config import LORA_FILE

    if not base or not os.path.isdir(base):
        raise UsageError(f"{os.path.join(lora_dir, LORA_FILE)}: its base checkpoint {base!r} is not there "
                         f"(moved? set `base` in that file to where it is now)")
    return base


def load_base(model, base_dir):
    """Read the base weights of `model` (a GPTModel with adapters, one pipeline stage, unwrapped)
    from the Megatron checkpoint in base_dir, whatever layout wrote it; the adapters are left as they are."""
    from megatron.core import dist_checkpointing

    parts = model.lora_checkpoint_parts
    set_checkpoint_parts(model, "base")
    try:
        loaded = dist_checkpointing.load(model.sharded_state_dict(), checkpoint_iteration_dir(base_dir))
    finally:
        set_checkpoint_parts(model, parts)
    missing, _ = model.load_state_dict(loaded, strict=False)
    unread = [name for name in missing if not is_adapter_name(name) and not name.endswith("_extra_state")]
    if unread:
        raise UsageError(f"{base_dir}: no {unread[0]} in the base checkpoint (and {len(unread) - 1} more)")
