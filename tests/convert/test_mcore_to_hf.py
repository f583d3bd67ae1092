"""convert_mcore_to_hf: exact round trips, a fixed point, bf16 kept, trained weights that
transformers reproduces, and bad input refused with the file named.

The imports (and the exports whose output is imported again) run as one batch in one process
(tests/convert/common.py run_batch: the start-up is paid once); the exports the tests check run
here, in this process.
"""

import json
import os
import shutil

import pytest

from sed_megatron.models.model_file import read_model_file

from ..training.launch import train
from .common import compare, convert_job, export_job, run_batch, save_hf, tensors, to_hf, training_config

ROUND_TRIP = ["llama_gqa_tied", "qwen2_bias", "mistral"]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """name -> (hf_dir, ckpt, Converted): the round-trip variants, a bf16 Qwen2 and an untied
    Llama imported; each round-trip variant also exported (out/) and imported again (ckpt2/)."""
    import torch

    from sed_megatron.testing.tiny_hf import tiny_hf_model

    root = tmp_path_factory.mktemp("mcore_to_hf")
    sources = {variant: save_hf(root / variant / "hf", variant, shard="40KB") for variant in ROUND_TRIP}
    sources["bf16"] = str(root / "bf16" / "hf")
    tiny_hf_model("qwen2_bias").to(torch.bfloat16).save_pretrained(sources["bf16"], max_shard_size="40KB")
    sources["untied"] = save_hf(root / "untied" / "hf", "llama_gqa_untied")
    jobs = [convert_job(hf_dir, root / name / "ckpt") for name, hf_dir in sources.items()]
    for variant in ROUND_TRIP:  # export -> import, for the fixed point
        jobs.append(export_job(root / variant / "ckpt", root / variant / "out", hf_template=sources[variant],
                               max_shard_size_mb=1))
        jobs.append(convert_job(root / variant / "out", root / variant / "ckpt2"))
    results = run_batch(jobs, root)
    for job, result in zip(jobs, results):
        assert not isinstance(result, Exception), (job, result)
    return {name: (hf_dir, str(root / name / "ckpt"), result) for (name, hf_dir), result in zip(sources.items(), results)}


@pytest.mark.parametrize("variant", ROUND_TRIP)
def test_hf_to_megatron_to_hf_is_bit_identical_and_a_fixed_point(batch, tmp_path, variant):
    hf_dir, ckpt, _ = batch[variant]
    done = to_hf(ckpt, tmp_path / "out", hf_template=hf_dir, max_shard_size_mb=1)
    original, exported = tensors(hf_dir), tensors(tmp_path / "out")
    assert original.keys() == exported.keys() and done.count == len(exported)
    for name in original:
        assert original[name].dtype == exported[name].dtype and (original[name] == exported[name]).all(), name
    with open(os.path.join(hf_dir, "config.json")) as f, open(tmp_path / "out" / "config.json") as g:
        a, b = json.load(f), json.load(g)
    for key in ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim",
                "vocab_size", "tie_word_embeddings", "rms_norm_eps", "intermediate_size"):
        assert a[key] == b[key], key
    # export -> import -> export: the same files again (the batch exported the same checkpoint to
    # out/, as above, and imported that as ckpt2/)
    batch_out = tensors(os.path.join(os.path.dirname(ckpt), "out"))
    assert batch_out.keys() == exported.keys()
    assert all(batch_out[n].dtype == exported[n].dtype and (batch_out[n] == exported[n]).all() for n in exported)
    to_hf(os.path.join(os.path.dirname(ckpt), "ckpt2"), tmp_path / "out2")
    again = tensors(tmp_path / "out2")
    assert again.keys() == exported.keys() and all((again[name] == exported[name]).all() for name in exported)


def test_bf16_stays_bf16_through_both_converters(batch, tmp_path):
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    hf_dir, ckpt, done = batch["bf16"]
    stored = FileSystemReader(os.path.join(ckpt, "iter_0000000")).read_metadata().state_dict_metadata
    dtypes = {md.properties.dtype for md in stored.values() if isinstance(md, TensorStorageMetadata)}
    assert dtypes == {torch.bfloat16}  # norms and biases too, as training saves them
    info = read_model_file(ckpt)
    assert (info["model_type"], info["dtype"], info["padded_vocab_size"]) == ("qwen2", "bfloat16", 1024)
    assert info["model"] == done.model_cfg.to_megatron_flags() and info["model"]["add_qkv_bias"] is True
    to_hf(ckpt, tmp_path / "out")
    original, exported = tensors(hf_dir), tensors(tmp_path / "out")
    assert original.keys() == exported.keys()
    assert all(exported[n].dtype == torch.bfloat16 and torch.equal(original[n], exported[n]) for n in original)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_trained_at_tp2_exports_to_what_transformers_computes(batch, tmp_path):
    hf_dir, ckpt, _ = batch["untied"]
    trained = str(tmp_path / "trained")
    train(str(tmp_path / "train"), 2, ["--load", ckpt, "--finetune", "--no-load-optim",
                                       "--no-load-rng", "--train-iters", "2", "--save", trained, "--save-interval", "2",
                                       "--sed-tau", "0.05", "--sft-num-samples", "16"], config=training_config(tmp_path))
    to_hf(trained, tmp_path / "out", hf_template=hf_dir)
    # fp32 on both sides, another summation order: ~1e-6.
    assert compare(tmp_path / "out", trained, tp=2) < 1e-4
    moved = max(float((tensors(tmp_path / "out")[n] - t).abs().max()) for n, t in tensors(hf_dir).items())
    assert moved > 1e-4  # the two steps changed the weights that transformers now reproduces


def test_export_errors_name_the_file(batch, tmp_path):
    with pytest.raises(ValueError, match="no sed_megatron_model.yaml"):
        to_hf(tmp_path, tmp_path / "x")
    hf_dir, converted, _ = batch["llama_gqa_tied"]
    ckpt = shutil.copytree(converted, tmp_path / "ckpt")  # a copy: its tracker is moved away below
    with pytest.raises(ValueError, match="output directory is not empty \\(use --overwrite\\)"):
        to_hf(ckpt, hf_dir)
    with pytest.raises(ValueError, match="nowhere: no config.json \\(--hf-template"):
        to_hf(ckpt, tmp_path / "x", hf_template=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of auto, bfloat16, float16, float32"):
        to_hf(ckpt, tmp_path / "x", dtype="fp8")
    os.rename(ckpt / "latest_checkpointed_iteration.txt", tmp_path / "tracker")
    with pytest.raises(ValueError, match="latest_checkpointed_iteration.txt: missing"):
        to_hf(ckpt, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")
