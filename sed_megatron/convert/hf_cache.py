"""A Hugging Face model directory given to training as --load: converted once into a cache, then reused.

    ckpt, note = converted_checkpoint(hf_dir, cache_dir)     # note: what was done, for the log

The cache is a Megatron checkpoint (tools/convert_hf_to_mcore.py's output) plus source.json:
the source directory and its fingerprint (config.json's bytes; each weight and index file's
name, size and modification time: a changed or replaced shard changes it, reading 15 GB to hash
it does not happen). A cache whose fingerprint matches is reused; one whose source changed is
converted again, and the note says so.
"""

import hashlib
import json
import os

from sed_megatron.runtime.mcore import TRACKER_FILE
from sed_megatron.utils import atomic_write_text

SOURCE_FILE = "source.json"


def is_hf_model_dir(path):
    """A directory with a config.json and no Megatron checkpoint in it."""
    return bool(path) and os.path.isfile(os.path.join(path, "config.json")) and not os.path.exists(
        os.path.join(path, TRACKER_FILE))


def fingerprint(hf_dir):
    digest = hashlib.sha256()
    with open(os.path.join(hf_dir, "config.json"), "rb") as f:
        digest.update(f.read())
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
            stat = os.stat(os.path.join(hf_dir, name))
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def source_of(hf_dir):
    return {"hf_dir": os.path.abspath(hf_dir), "fingerprint": fingerprint(hf_dir)}


def cached_source(cache_dir):
    """What the cache was converted from ({hf_dir, fingerprint}), or None (no complete cache)."""
    path = os.path.join(cache_dir, SOURCE_FILE)
    if not (os.path.exists(path) and os.path.exists(os.path.join(cache_dir, TRACKER_FILE))):
        return None
    with open(path) as f:
        return json.load(f)


def converted_checkpoint(hf_dir, cache_dir, log=None):
    """(the Megatron checkpoint of hf_dir in cache_dir, a note): converted now (in a process of its
    own) unless the cache holds this source already. ValueError (one line) for a model the
    converter refuses."""
    from sed_megatron.launch import OUTSIDE_THE_WORLD, run_isolated

    from .hf_to_mcore import convert_hf_to_mcore

    source = source_of(hf_dir)
    stored = cached_source(cache_dir)
    if stored == source:
        return cache_dir, f"reusing the conversion of {hf_dir} in {cache_dir}"
    if log is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    note = (f"converted {hf_dir} into {cache_dir}" if stored is None else
            f"{hf_dir} changed since its conversion in {cache_dir}: converted it again")
    run_isolated(convert_hf_to_mcore, hf_dir, cache_dir, overwrite=True, progress=False, log=log, timeout=24 * 3600,
                 env=OUTSIDE_THE_WORLD)  # from global rank 0 of a run: a world of its own
    atomic_write_text(os.path.join(cache_dir, SOURCE_FILE), json.dumps(source))  # last: the cache is complete
    return cache_dir, note
