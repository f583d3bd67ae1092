"""Raw SFT data given to training (`--sft-data-kind chat`): tokenized once into a cache, then reused.

    prefix, note = tokenized_dataset(cfg, cache_dir)    # cfg: a PreprocessConfig without output_prefix

The cache holds one indexed dataset per (data, tokenizer, settings): `<cache_dir>/<key>/data`
(tools/preprocess_sft_data.py's output, byte for byte) and `done.json`, written last. The key
hashes the settings, each input file's name, size and modification time and the tokenizer's
files (its chat template too): a changed input or tokenizer gives another key, so the data is tokenized again.
"""

import dataclasses
import hashlib
import json
import os

from sed_megatron.utils import atomic_write_text

from .sources import open_source

DONE_FILE = "done.json"


def cache_key(cfg):
    digest = hashlib.sha256()
    settings = dataclasses.asdict(cfg)
    for volatile in ("output_prefix", "workers", "tokenizer", "input"):
        settings.pop(volatile)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    source = open_source(cfg.input)
    for part in source.parts:
        path = getattr(part, "path", "")
        if os.path.isfile(path):
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        else:  # a saved dataset: its own fingerprint
            digest.update(f"{cfg.input}:{getattr(part.dataset, '_fingerprint', '')}\n".encode())
    for name in sorted(os.listdir(cfg.tokenizer)):
        path = os.path.join(cfg.tokenizer, name)
        if os.path.isfile(path) and (name.startswith("tokenizer") or name.endswith((".model", ".json", ".txt", ".jinja"))):
            with open(path, "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def done(directory):
    """What a complete cache entry holds ({input, tokenizer, summary}), or None."""
    path = os.path.join(directory, DONE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def tokenized_dataset(cfg, cache_dir, progress=False):
    """(the indexed dataset prefix of cfg.input tokenized with cfg.tokenizer, a note): made now
    unless the cache holds it. ValueError (one line, naming the file and row) on bad data."""
    from .sft_preprocess import preprocess, summary_line

    directory = os.path.join(cache_dir, cache_key(cfg))
    prefix = os.path.join(directory, "data")
    if done(directory) is not None:
        return prefix, f"reusing {cfg.input} tokenized in {directory}"
    try:
        summary = preprocess(dataclasses.replace(cfg, output_prefix=prefix), progress=progress)
    except BaseException:
        if os.path.isdir(directory) and not os.listdir(directory):  # preprocess leaves nothing at the prefix
            os.rmdir(directory)
        raise
    atomic_write_text(os.path.join(directory, DONE_FILE), json.dumps(
        {"input": cfg.input, "tokenizer": os.path.abspath(cfg.tokenizer),
         "summary": {k: summary[k] for k in ("samples", "tokens", "loss_tokens", "skipped", "schemas", "lengths")}}))
    return prefix, f"tokenized {cfg.input} into {directory}: {summary_line(summary)}"
