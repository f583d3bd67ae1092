"""tools/convert_mcore_to_hf.py: exact round trips, a fixed point, and trained weights that transformers reproduces."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from ..training.launch import REPO, TINY, _env, train
from .test_hf_to_mcore import compare, convert, save_hf

EXPORT = os.path.join(REPO, "tools", "convert_mcore_to_hf.py")


def export(ckpt, save, *flags):
    out = subprocess.run([sys.executable, EXPORT, "--load", ckpt, "--save", save, *flags], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    return out


def tensors(directory):
    from safetensors.torch import load_file

    files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    result = {}
    for name in files:
        result.update(load_file(os.path.join(directory, name)))
    return result


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2_bias", "mistral"])
def test_hf_to_megatron_to_hf_is_bit_identical_and_a_fixed_point(tmp_path, variant):
    hf_dir = save_hf(tmp_path / "hf", variant, shard="40KB")
    assert convert(hf_dir, str(tmp_path / "ckpt")).returncode == 0
    out = export(str(tmp_path / "ckpt"), str(tmp_path / "out"), "--hf-template", hf_dir, "--max-shard-size-mb", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    original, exported = tensors(hf_dir), tensors(tmp_path / "out")
    assert original.keys() == exported.keys()
    for name in original:
        assert original[name].dtype == exported[name].dtype and (original[name] == exported[name]).all(), name
    with open(os.path.join(hf_dir, "config.json")) as f, open(tmp_path / "out" / "config.json") as g:
        a, b = json.load(f), json.load(g)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size",
                "tie_word_embeddings", "rms_norm_eps", "intermediate_size"):
        assert a[key] == b[key], key
    # export -> import -> export: the same files again
    assert convert(str(tmp_path / "out"), str(tmp_path / "ckpt2")).returncode == 0
    assert export(str(tmp_path / "ckpt2"), str(tmp_path / "out2")).returncode == 0
    again = tensors(tmp_path / "out2")
    assert all((again[name] == exported[name]).all() for name in exported) and again.keys() == exported.keys()


def test_bf16_stays_bf16_through_both_converters(tmp_path):
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from sed_megatron.testing.tiny_hf import tiny_hf_model

    hf_dir = str(tmp_path / "hf")
    tiny_hf_model("qwen2_bias").to(torch.bfloat16).save_pretrained(hf_dir, max_shard_size="40KB")
    out = convert(hf_dir, str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr[-3000:]
    stored = FileSystemReader(str(tmp_path / "ckpt" / "iter_0000000")).read_metadata().state_dict_metadata
    dtypes = {md.properties.dtype for md in stored.values() if isinstance(md, TensorStorageMetadata)}
    assert dtypes == {torch.bfloat16}  # norms and biases too, as training saves them
    out = export(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-3000:]
    original, exported = tensors(hf_dir), tensors(tmp_path / "out")
    assert original.keys() == exported.keys()
    assert all(exported[n].dtype == torch.bfloat16 and torch.equal(original[n], exported[n]) for n in original)


def test_trained_at_tp2_exports_to_what_transformers_computes(tmp_path):
    hf_dir = save_hf(tmp_path / "hf", "llama_gqa_untied")
    assert convert(hf_dir, str(tmp_path / "ckpt")).returncode == 0
    with open(TINY) as f:
        run = yaml.safe_load(f)
    del run["model"]
    run["training"]["seq_length"] = 64
    run["checkpoint"] = {}
    config = str(tmp_path / "run.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(run, f)
    trained = str(tmp_path / "trained")
    train(str(tmp_path / "train"), 2, ["--load", str(tmp_path / "ckpt"), "--finetune", "--no-load-optim",
                                       "--no-load-rng", "--train-iters", "2", "--save", trained, "--save-interval", "2",
                                       "--sed-tau", "0.05", "--sft-num-samples", "16"], config=config)
    out = export(trained, str(tmp_path / "out"), "--hf-template", hf_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert compare(str(tmp_path / "out"), trained, 2) < 1e-4
    moved = max(float((tensors(tmp_path / "out")[n] - t).abs().max()) for n, t in tensors(hf_dir).items())
    assert moved > 1e-4  # the two steps changed the weights that transformers now reproduces


def test_export_errors(tmp_path):
    out = export(str(tmp_path), str(tmp_path / "x"))
    assert out.returncode == 2 and "no sed_megatron_model.yaml" in out.stderr.strip().splitlines()[-1]
    hf_dir = save_hf(tmp_path / "hf", "llama_gqa_tied")
    assert convert(hf_dir, str(tmp_path / "ckpt")).returncode == 0
    out = export(str(tmp_path / "ckpt"), hf_dir)
    assert out.returncode == 2 and "output directory is not empty (use --overwrite)" in out.stderr
