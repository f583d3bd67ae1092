"""The model file beside a Megatron checkpoint: what its weights mean.

`sed_megatron_model.yaml` holds the architecture as Megatron-LM flags (`model:`), the Hugging
Face model_type, the padded vocabulary size and the dtype. The converter writes it, training
copies it into its --save, and `sed_megatron.train --load CKPT_DIR`, the export and the compare
read it, so the architecture never has to be repeated.
"""

import os

import yaml

from sed_megatron.utils import UsageError

from .config import ModelConfig

MODEL_FILE = "sed_megatron_model.yaml"


def read_model_file(checkpoint_dir):
    """The architecture stored beside a converted checkpoint (a dict), or None."""
    path = os.path.join(checkpoint_dir or "", MODEL_FILE)
    if not checkpoint_dir or not os.path.exists(path):
        return None
    with open(path) as f:
        info = yaml.safe_load(f)
    if not isinstance(info, dict) or not {"model", "model_type", "padded_vocab_size"} <= set(info):
        raise UsageError(f"{path}: not a sed_megatron model file (model, model_type, padded_vocab_size expected)")
    return info


def model_config_from_file(checkpoint_dir, transformer_impl="local"):
    """(ModelConfig, dtype name) of a converted (or trained-from-converted) checkpoint, or None
    without a model file; ValueError naming the file and key when it cannot be read."""
    info = read_model_file(checkpoint_dir)
    if info is None:
        return None
    path = os.path.join(checkpoint_dir, MODEL_FILE)
    if not isinstance(info["model"], dict):
        raise UsageError(f"{path}: model must be a mapping of Megatron-LM flags")
    cfg = ModelConfig.from_megatron_flags(info["model"], info["padded_vocab_size"], model_type=info["model_type"],
                                          transformer_impl=transformer_impl, where=f"{path}: model")
    return cfg, info.get("dtype", "float32")


def write_model_file(directory, model_cfg, dtype_name):
    """The model file of a checkpoint: readable by read_model_file and by every earlier version's."""
    with open(os.path.join(directory, MODEL_FILE), "w") as f:
        yaml.safe_dump({"model_type": model_cfg.model_type, "model": model_cfg.to_megatron_flags(),
                        "padded_vocab_size": model_cfg.padded_vocab_size, "dtype": dtype_name}, f, sort_keys=False)
