"""Qwen3 and Qwen3-MoE through both converters, the compare tool at TP x PP and at EP x TP, and
training at EP=2 whose export transformers reproduces.

Launches are few (each costs seconds of start-up on 2 cores): one batch of 4 processes
(tests/convert/common.py run_batch) converts both models and runs the three comparisons at
TP x PP and EP x TP (and one against another random MoE, which must fail); one training run and
its comparison. Tolerance everywhere: fp32 on both sides, the same operations in another order
(~2e-7 measured), held to 1e-4 as for the other families.
"""

import json
import os

import pytest
import torch

from sed_megatron.convert.hf_to_mcore import convert_hf_to_mcore
from sed_megatron.models import family_for
from sed_megatron.testing.tiny_hf import tiny_hf_model

from ..training.launch import train
from .common import compare, compare_job, convert_job, run_batch, save_hf, tensors, to_hf, training_config

ATOL = 1e-4


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A tiny random Qwen3-MoE (6 experts, top-2 renormalized) as save_pretrained writes it (one
    tensor per expert) and a dense tied Qwen3, converted and compared at TP=2 x PP=2 (and the MoE
    with its experts split over EP=2, each expert's MLP over expert TP=2)."""
    root = tmp_path_factory.mktemp("qwen3")
    moe = save_hf(root / "moe" / "hf", "qwen3_moe", shard="60KB")
    dense = save_hf(root / "dense" / "hf", "qwen3_tied", shard="40KB")
    other = str(root / "other")
    tiny_hf_model("qwen3_moe", seed=1).save_pretrained(other)
    moe_ckpt, dense_ckpt = root / "moe" / "ckpt", root / "dense" / "ckpt"
    jobs = [convert_job(moe, moe_ckpt), convert_job(dense, dense_ckpt), compare_job(moe, moe_ckpt, tp=2, pp=2),
            compare_job(moe, moe_ckpt, tp=2, ep=2), compare_job(dense, dense_ckpt, tp=2, pp=2),
            compare_job(other, moe_ckpt, tp=2, ep=2)]
    results = run_batch(jobs, root)
    for job, result in zip(jobs[:2], results[:2]):
        assert not isinstance(result, Exception), (job, result)
    names = ["moe_tp2_pp2", "moe_tp2_ep2", "dense_tp2_pp2", "other_tp2_ep2"]
    return {"moe": (moe, str(moe_ckpt)), "dense": (dense, str(dense_ckpt)), **dict(zip(names, results[2:]))}


@pytest.fixture(scope="module")
def moe_checkpoint(batch):
    return batch["moe"]


def hf_logits(hf_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def test_stacked_experts_read_as_the_same_tensors(moe_checkpoint, tmp_path):
    """transformers' own layout (save_pretrained(save_original_format=False): one gate_up_proj and
    one down_proj per layer, experts stacked) gives the importer exactly the per-expert tensors,
    each stacked tensor read once and let go after its last expert (in this process: no Megatron)."""
    from sed_megatron.convert.checkpoint import HFTensors
    from sed_megatron.convert.hf_to_mcore import SharedReads, check_every_tensor_maps, model_config_from_hf_dir

    hf_dir, _ = moe_checkpoint
    stacked_dir = str(tmp_path / "stacked")
    tiny_hf_model("qwen3_moe").save_pretrained(stacked_dir, save_original_format=False, max_shard_size="60KB")
    _, cfg = model_config_from_hf_dir(stacked_dir)
    family = family_for("qwen3_moe")
    converted = {}
    for directory in (hf_dir, stacked_dir):
        stored = HFTensors(directory)
        check_every_tensor_maps(directory, cfg, stored)  # every stored tensor has its row, and no row lacks one
        rows = family.rows(cfg, stored=stored)
        read = SharedReads(stored, rows)
        converted[directory] = {row.megatron: row.mapping.to_megatron(cfg, *map(read, row.hf)) for row in rows}
        assert not read._kept  # nothing held once every row has its tensor
    assert "model.layers.1.mlp.experts.gate_up_proj" in HFTensors(stacked_dir)
    assert "model.layers.1.mlp.experts.5.gate_proj.weight" in HFTensors(hf_dir)  # the Hub's per-expert names
    ours, theirs = converted[hf_dir], converted[stacked_dir]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_qwen3_moe_bit_identical_out_and_logits_at_tp_pp_ep(batch, moe_checkpoint, tmp_path):
    hf_dir, ckpt = moe_checkpoint
    original = tensors(hf_dir)
    to_hf(ckpt, tmp_path / "out", hf_template=hf_dir, max_shard_size_mb=1)
    exported = tensors(tmp_path / "out")
    assert exported.keys() == original.keys()
    assert all(exported[n].dtype == original[n].dtype and torch.equal(exported[n], original[n]) for n in original)
    from transformers import AutoConfig

    a, b = AutoConfig.from_pretrained(hf_dir), AutoConfig.from_pretrained(tmp_path / "out")
    for key in ("model_type", "architectures", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "norm_topk_prob", "router_aux_loss_coef", "decoder_sparse_step", "mlp_only_layers", "head_dim",
                "num_key_value_heads", "rope_parameters", "tie_word_embeddings", "rms_norm_eps"):
        assert getattr(a, key) == getattr(b, key), key
    tokens = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(str(tmp_path / "out"), tokens), hf_logits(hf_dir, tokens))  # it loads, unchanged

    # Megatron at TP=2 x PP=2, and with the experts split over EP=2 (each expert's MLP over expert TP=2).
    assert batch["moe_tp2_pp2"].max_abs_logit_diff < ATOL
    assert batch["moe_tp2_ep2"].max_abs_logit_diff < ATOL
    # Another random MoE against this checkpoint: far outside the tolerance.
    assert not batch["other_tp2_ep2"].ok and batch["other_tp2_ep2"].max_abs_logit_diff > 1e-2


def test_qwen3_moe_trained_at_ep2_exports_to_what_transformers_computes(moe_checkpoint, tmp_path):
    hf_dir, ckpt = moe_checkpoint
    trained = str(tmp_path / "trained")
    records = train(str(tmp_path / "train"), 2, [
        "--load", ckpt, "--finetune", "--no-load-optim", "--no-load-rng", "--train-iters", "2", "--save", trained,
        "--save-interval", "2", "--sed-tau", "0.05", "--sft-num-samples", "16", "--tensor-model-parallel-size", "1",
        "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"], config=training_config(tmp_path))
    assert [r["iteration"] for r in records] == [1, 2]
    # The routers' load-balancing loss beside the objective: E * sum_i f_i P_i, 1 when balanced, up to E / k.
    assert all(0.9 < r["moe_aux_loss"] < 3.0 and r["loss"] > 0 for r in records)
    to_hf(trained, tmp_path / "out", hf_template=hf_dir)
    assert compare(tmp_path / "out", trained, tp=1, ep=2) < ATOL
    before, after = tensors(hf_dir), tensors(tmp_path / "out")
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
                 "model.layers.0.self_attn.q_norm.weight"):
        assert float((after[name] - before[name]).abs().max()) > 1e-4, name  # the two steps moved them


def test_qwen3_dense_round_trip_and_logits_at_tp2_pp2(batch, tmp_path):
    hf_dir, ckpt = batch["dense"]
    to_hf(ckpt, tmp_path / "out", hf_template=hf_dir)
    original, exported = tensors(hf_dir), tensors(tmp_path / "out")
    assert original.keys() == exported.keys() and all(torch.equal(original[n], exported[n]) for n in original)
    assert batch["dense_tp2_pp2"].max_abs_logit_diff < ATOL


@pytest.mark.parametrize("change,message", [
    ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size=64: shared experts are not supported"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step=2 is not supported"),
    ({"mlp_only_layers": [0]}, "mlp_only_layers=\\[0\\] is not supported"),
])
def test_moe_variants_stop_before_anything_is_written(tmp_path, change, message):
    """Checked before Megatron starts, in this process: one line naming config.json and the field."""
    hf_dir = tmp_path / "hf"
    tiny_hf_model("qwen3_moe").save_pretrained(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=f"^{hf_dir}/config.json: {message}") as err:
        convert_hf_to_mcore(str(hf_dir), str(tmp_path / "out"))
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "out") and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
