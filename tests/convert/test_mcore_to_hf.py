"""convert_mcore_to_hf: exact round trips, a fixed point, bf16 kept, trained weights that
transformers reproduces, and bad input refused with the file named."""

import json
import os

import pytest

from sed_megatron.models.model_file import read_model_file

from ..training.launch import train
from .common import compare, export, save_hf, tensors, to_hf, to_mcore, training_config  # noqa: F401  (export: tests/examples)


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2_bias", "mistral"])
def test_hf_to_megatron_to_hf_is_bit_identical_and_a_fixed_point(tmp_path, variant):
    hf_dir = save_hf(tmp_path / "hf", variant, shard="40KB")
    to_mcore(hf_dir, tmp_path / "ckpt")
    done = to_hf(tmp_path / "ckpt", tmp_path / "out", hf_template=hf_dir, max_shard_size_mb=1)
    original, exported = tensors(hf_dir), tensors(tmp_path / "out")
    assert original.keys() == exported.keys() and done.count == len(exported)
    for name in original:
        assert original[name].dtype == exported[name].dtype and (original[name] == exported[name]).all(), name
    with open(os.path.join(hf_dir, "config.json")) as f, open(tmp_path / "out" / "config.json") as g:
        a, b = json.load(f), json.load(g)
    for key in ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim",
                "vocab_size", "tie_word_embeddings", "rms_norm_eps", "intermediate_size"):
        assert a[key] == b[key], key
    # export -> import -> export: the same files again
    to_mcore(tmp_path / "out", tmp_path / "ckpt2")
    to_hf(tmp_path / "ckpt2", tmp_path / "out2")
    again = tensors(tmp_path / "out2")
    assert again.keys() == exported.keys() and all((again[name] == exported[name]).all() for name in exported)


def test_bf16_stays_bf16_through_both_converters(tmp_path):
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from sed_megatron.testing.tiny_hf import tiny_hf_model

    hf_dir = str(tmp_path / "hf")
    tiny_hf_model("qwen2_bias").to(torch.bfloat16).save_pretrained(hf_dir, max_shard_size="40KB")
    done = to_mcore(hf_dir, tmp_path / "ckpt")
    stored = FileSystemReader(str(tmp_path / "ckpt" / "iter_0000000")).read_metadata().state_dict_metadata
    dtypes = {md.properties.dtype for md in stored.values() if isinstance(md, TensorStorageMetadata)}
    assert dtypes == {torch.bfloat16}  # norms and biases too, as training saves them
    info = read_model_file(str(tmp_path / "ckpt"))
    assert (info["model_type"], info["dtype"], info["padded_vocab_size"]) == ("qwen2", "bfloat16", 1024)
    assert info["model"] == done.model_cfg.to_megatron_flags() and info["model"]["add_qkv_bias"] is True
    to_hf(tmp_path / "ckpt", tmp_path / "out")
    original, exported = tensors(hf_dir), tensors(tmp_path / "out")
    assert original.keys() == exported.keys()
    assert all(exported[n].dtype == torch.bfloat16 and torch.equal(original[n], exported[n]) for n in original)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_trained_at_tp2_exports_to_what_transformers_computes(tmp_path):
    hf_dir = save_hf(tmp_path / "hf", "llama_gqa_untied")
    to_mcore(hf_dir, tmp_path / "ckpt")
    trained = str(tmp_path / "trained")
    train(str(tmp_path / "train"), 2, ["--load", str(tmp_path / "ckpt"), "--finetune", "--no-load-optim",
                                       "--no-load-rng", "--train-iters", "2", "--save", trained, "--save-interval", "2",
                                       "--sed-tau", "0.05", "--sft-num-samples", "16"], config=training_config(tmp_path))
    to_hf(trained, tmp_path / "out", hf_template=hf_dir)
    # fp32 on both sides, another summation order: ~1e-6.
    assert compare(tmp_path / "out", trained, tp=2) < 1e-4
    moved = max(float((tensors(tmp_path / "out")[n] - t).abs().max()) for n, t in tensors(hf_dir).items())
    assert moved > 1e-4  # the two steps changed the weights that transformers now reproduces


def test_export_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no sed_megatron_model.yaml"):
        to_hf(tmp_path, tmp_path / "x")
    hf_dir = save_hf(tmp_path / "hf", "llama_gqa_tied")
    to_mcore(hf_dir, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="output directory is not empty \\(use --overwrite\\)"):
        to_hf(tmp_path / "ckpt", hf_dir)
    with pytest.raises(ValueError, match="nowhere: no config.json \\(--hf-template"):
        to_hf(tmp_path / "ckpt", tmp_path / "x", hf_template=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of auto, bfloat16, float16, float32"):
        to_hf(tmp_path / "ckpt", tmp_path / "x", dtype="fp8")
    os.rename(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt", tmp_path / "tracker")
    with pytest.raises(ValueError, match="latest_checkpointed_iteration.txt: missing"):
        to_hf(tmp_path / "ckpt", tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")
