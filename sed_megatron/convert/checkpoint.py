"""Hugging Face directory -> Megatron distributed checkpoint (and what training needs to load it).

    python tools/convert_hf_to_mcore.py --hf-dir HF_DIR --save CKPT_DIR

The checkpoint is Megatron-LM's own (torch_dist, `iter_0000000`), written by its
save_checkpoint from a TP=1 model, so training loads it at any TP x PP. Beside it,
`sed_megatron_model.yaml` holds the architecture as Megatron-LM flags, the padded vocabulary
size and the Hugging Face model type; `sed_megatron.train --load CKPT_DIR` reads it, so the
architecture need not be repeated. The vocabulary is padded to a multiple of 1024 rows, so
the embedding splits evenly at any TP dividing 1024; the padding rows are zero.
"""

import json
import os
import shutil

import yaml

MODEL_FILE = "sed_megatron_model.yaml"
VOCAB_MULTIPLE = 1024


def padded_vocab_size(vocab_size):
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def read_model_file(checkpoint_dir):
    """The architecture stored beside a converted checkpoint, or None."""
    path = os.path.join(checkpoint_dir or "", MODEL_FILE)
    if not checkpoint_dir or not os.path.exists(path):
        return None
    with open(path) as f:
        info = yaml.safe_load(f)
    if not isinstance(info, dict) or not {"model", "model_type", "padded_vocab_size"} <= set(info):
        raise ValueError(f"{path}: not a sed_megatron model file (model, model_type, padded_vocab_size expected)")
    return info


class HFTensors:
    """Tensors of a Hugging Face directory, read one at a time from (sharded) safetensors."""

    def __init__(self, hf_dir):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                self.where = json.load(f)["weight_map"]
        elif os.path.exists(single):
            with safe_open(single, framework="pt") as f:
                self.where = {name: "model.safetensors" for name in f.keys()}
        else:
            raise ValueError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self._open = {}
        self._safe_open = safe_open

    def shard_names(self):
        return sorted(set(self.where.values()))

    def __contains__(self, name):
        return name in self.where

    def __call__(self, name):
        if name not in self.where:
            raise ValueError(f"{self.hf_dir}: tensor {name} is missing from the checkpoint")
        shard = self.where[name]
        if shard not in self._open:
            path = os.path.join(self.hf_dir, shard)
            if not os.path.exists(path):
                raise ValueError(f"{path}: shard listed in the index is missing")
            try:
                self._open[shard] = self._safe_open(path, framework="pt")
            except Exception as err:  # safetensors raises its own error types for corrupt files
                raise ValueError(f"{path}: cannot read the shard ({err})") from None
        try:
            return self._open[shard].get_tensor(name)
        except Exception as err:
            raise ValueError(f"{os.path.join(self.hf_dir, shard)}: cannot read {name} ({err})") from None


def single_process_env():
    """A torch.distributed world of one process for the converters, unless torchrun set one up."""
    import socket

    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    elif os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("run the converter as a single process (no torchrun with several processes)")


def check_output_dir(path, overwrite):
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise ValueError(f"{path}: output directory is not empty (use --overwrite)")


def publish(tmp_dir, final_dir):
    """Move a finished output into place (replacing what --overwrite allowed)."""
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
