"""One command from a Hugging Face model to a Hugging Face model: `--load HF_DIR --save-hf OUT`.

The export equals convert -> train -> export run by hand with the same settings, bit for bit;
the conversion is cached and reused while the source is unchanged, and made again when it
changes; a second run into the same --save resumes from its own checkpoint; --save-hf-every-save
exports each checkpoint as it is saved."""

import os

import pytest
import torch

from sed_megatron.convert.hf_cache import cached_source, converted_checkpoint, source_of

from ..convert.common import save_hf, tensors, to_hf, to_mcore, training_config
from .launch import train

pytestmark = pytest.mark.e2e

FLAGS = ["--train-iters", "2", "--loss-type", "sed", "--sed-tau", "0.5"]


def _log(run_dir):
    with open(os.path.join(run_dir, "train.log")) as f:
        return f.read()


def _one_command_equals_by_hand(tmp_path, variant, extra=()):
    """`--load HF_DIR --save-hf OUT` (extra: more flags), then convert -> train -> export by hand with
    the same settings: the two exports are equal bit for bit, and differ from the source (it trained)."""
    from transformers import AutoModelForCausalLM

    hf_dir = save_hf(tmp_path / "hf", variant)
    config = training_config(tmp_path)
    cache, out = str(tmp_path / "cache"), tmp_path / "out"
    train(str(tmp_path / "one"), 1, ["--load", hf_dir, "--save", str(tmp_path / "save"), "--save-hf", str(out),
                                     "--hf-cache-dir", cache, *extra, *FLAGS], config=config)
    assert f"converted {hf_dir} into {cache}" in _log(tmp_path / "one")
    AutoModelForCausalLM.from_pretrained(out)  # loads as it is

    by_hand = str(tmp_path / "ckpt")
    to_mcore(hf_dir, by_hand)
    train(str(tmp_path / "hand"), 1, ["--load", by_hand, "--finetune", "--no-load-optim", "--no-load-rng", "--save",
                                      str(tmp_path / "save_hand"), *FLAGS], config=config)
    to_hf(tmp_path / "save_hand", tmp_path / "out_hand", hf_template=hf_dir)
    ours, theirs = tensors(out), tensors(tmp_path / "out_hand")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert any(not torch.equal(ours[n], t) for n, t in tensors(hf_dir).items())  # it trained
    return hf_dir, config, cache, out


def test_llama_in_llama_out(tmp_path):
    _one_command_equals_by_hand(tmp_path, "llama_gqa_untied")


def test_hf_model_in_hf_model_out(tmp_path):
    """A tiny Qwen3 (tied embeddings), exported at each save; then the resume and the cache."""
    hf_dir, config, cache, out = _one_command_equals_by_hand(
        tmp_path, "qwen3_tied", ["--save-hf-every-save", "--save-interval", "1"])
    log = _log(tmp_path / "one")
    # --save-hf-every-save: each checkpoint exported once saved; the last export is the end's (not made twice)
    for iteration in (1, 2):
        assert f"saved the Hugging Face export of {tmp_path / 'save'} (iteration {iteration}) to {out}" in log
    assert log.count("saved the Hugging Face export") == 2

    # Into the same --save: it resumes from its own checkpoint instead (iteration 2 -> 3).
    again = train(str(tmp_path / "again"), 1, ["--load", hf_dir, "--save", str(tmp_path / "save"), "--hf-cache-dir",
                                               cache, *FLAGS, "--train-iters", "3", "--override-opt_param-scheduler"],
                  config=config)
    assert [r["iteration"] for r in again] == [3]
    assert f"resuming from the newest checkpoint in {tmp_path / 'save'}" in _log(tmp_path / "again")

    # The cache: reused while the source is unchanged; after a weight file changes, converted again.
    assert converted_checkpoint(hf_dir, cache) == (cache, f"reusing the conversion of {hf_dir} in {cache}")
    shard = next(os.path.join(hf_dir, n) for n in sorted(os.listdir(hf_dir)) if n.endswith(".safetensors"))
    os.utime(shard, ns=(os.stat(shard).st_atime_ns, os.stat(shard).st_mtime_ns + 10**9))
    assert converted_checkpoint(hf_dir, cache) == (cache, f"{hf_dir} changed since its conversion in {cache}: "
                                                          f"converted it again")
    assert cached_source(cache) == source_of(hf_dir)
