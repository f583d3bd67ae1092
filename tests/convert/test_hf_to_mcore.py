"""convert_hf_to_mcore on tiny random models: logits equal to transformers at TP=1/2 and PP=2,
checkpoints training loads at any layout, and bad input refused with the file named.

The conversions and comparisons run as one batch in one pair of processes (tests/convert/common.py
run_batch: the start-up is paid once, not per conversion), with a comparison that must fail (the
checkpoint of another random model) to show that the batch tells models apart.
"""

import json
import os
import shutil

import pytest

from sed_megatron.convert.hf_to_mcore import convert_hf_to_mcore
from sed_megatron.models.model_file import read_model_file
from sed_megatron.testing.tiny_hf import tiny_hf_model

from ..training.launch import train
from .common import compare_job, convert_job, run_batch, save_hf, training_config

LAYOUTS = {"llama_gqa_untied": [(2, 1), (1, 2)], "llama_gqa_tied": [(2, 1)], "qwen2_bias": [(2, 1)],
           "llama_rope_scaling": [(2, 1)]}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Every variant converted and compared at its layouts; a config that disagrees with its
    weights converted (it must fail); another random Llama compared with the untied checkpoint."""
    root = tmp_path_factory.mktemp("hf_to_mcore")
    jobs, where = [], {}
    for variant in LAYOUTS:
        hf_dir, ckpt = save_hf(root / variant / "hf", variant), root / variant / "ckpt"
        where[variant] = (hf_dir, str(ckpt))
        jobs.append(convert_job(hf_dir, ckpt))
    mismatch = save_hf(root / "mismatch", "llama_gqa_untied")
    with open(os.path.join(mismatch, "config.json")) as f:
        config = json.load(f)
    config["intermediate_size"] = 80
    with open(os.path.join(mismatch, "config.json"), "w") as f:
        json.dump(config, f)
    where["mismatch"] = (mismatch, str(root / "c"))
    jobs.append(convert_job(mismatch, root / "c"))
    for variant, layouts in LAYOUTS.items():
        jobs.extend(compare_job(*where[variant], tp, pp) for tp, pp in layouts)
    other = str(root / "other")
    tiny_hf_model("llama_gqa_untied", seed=1).save_pretrained(other)
    jobs.append(compare_job(other, where["llama_gqa_untied"][1], 2, 1))
    results = run_batch(jobs, root)
    converted = dict(zip(list(LAYOUTS) + ["mismatch"], results))
    compared = {}
    for job, result in zip(jobs[len(converted):-1], results[len(converted):-1]):
        compared.setdefault(job[2], []).append((job[3]["tp"], job[3]["pp"], result))
    return {"root": root, "where": where, "converted": converted, "compared": compared, "other": results[-1]}


@pytest.mark.parametrize("variant", list(LAYOUTS))
def test_converted_logits_equal_transformers(batch, variant):
    hf_dir, ckpt = batch["where"][variant]
    done = batch["converted"][variant]
    assert not isinstance(done, Exception), done
    assert done.model_cfg.model_type == read_model_file(ckpt)["model_type"]
    compared = batch["compared"][ckpt]
    assert [(tp, pp) for tp, pp, _ in compared] == LAYOUTS[variant]
    for tp, pp, result in compared:
        # fp32 on both sides, another summation order: ~1e-6.
        assert result.max_abs_logit_diff < 1e-4, (tp, pp, result)


def test_another_model_is_told_apart(batch):
    """The same architecture with other random weights: far outside the tolerance, not ok."""
    result = batch["other"]
    assert not result.ok and result.max_abs_logit_diff > 1e-2, result


def test_training_loads_the_converted_checkpoint_at_another_layout(batch, tmp_path):
    """Converted at TP=PP=1, trained at PP=2 (TP / PP / DP parity of training: tests/training/test_train.py)."""
    _, ckpt = batch["where"]["llama_gqa_untied"]
    records = train(str(tmp_path / "pp2"), 2, ["--load", ckpt, "--finetune", "--no-load-optim", "--no-load-rng",
                                               "--train-iters", "2", "--save", "", "--sed-tau", "0.05",
                                               "--sft-num-samples", "16", "--tensor-model-parallel-size", "1",
                                               "--pipeline-model-parallel-size", "2"],
                    config=training_config(tmp_path))
    # The converted random model: CE near log(120) = 4.79 over the real vocabulary, not log(1024)
    # (a wrong mapping or padded rows that take probability mass are far from it).
    assert 4.5 < records[0]["ce_loss"] < 5.1


def _copy(hf_dir, target):
    shutil.copytree(hf_dir, target)
    return target


def test_bad_inputs_name_the_file_and_leave_nothing(tmp_path):
    """Checked before Megatron starts: called in this process, which they leave untouched."""
    import transformers

    world = {key: os.environ.get(key) for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="gpt2/config.json: unsupported model_type 'gpt2'; supported: llama, mistral, qwen2, "
                                         "qwen3, qwen3_moe"):
        convert_hf_to_mcore(str(gpt2), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="absent: no config.json"):
        convert_hf_to_mcore(str(tmp_path / "absent"), str(tmp_path / "out"))

    hf_dir = save_hf(tmp_path / "hf", "llama_gqa_untied")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="output directory is not empty \\(use --overwrite\\)"):
        convert_hf_to_mcore(hf_dir, str(tmp_path / "full"))

    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    missing_shard = _copy(hf_dir, tmp_path / "missing_shard")
    os.remove(missing_shard / shard)
    with pytest.raises(ValueError, match=f"{shard}: shard listed in the index is missing"):
        convert_hf_to_mcore(str(missing_shard), str(tmp_path / "out"))

    corrupt = _copy(hf_dir, tmp_path / "corrupt")
    with open(corrupt / shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=f"{shard}: cannot read the shard"):
        convert_hf_to_mcore(str(corrupt), str(tmp_path / "out"))

    from sed_megatron.testing.tiny_hf import make_tokenizer

    big_vocab = _copy(hf_dir, tmp_path / "big_vocab")
    make_tokenizer(str(big_vocab), [f"w{i}" for i in range(130)])
    with pytest.raises(ValueError, match="config.json: vocab_size 120 is smaller than the tokenizer's 148 tokens"):
        convert_hf_to_mcore(str(big_vocab), str(tmp_path / "out"))

    sliding = _copy(save_hf(tmp_path / "mistral", "mistral"), tmp_path / "sliding")
    config = json.loads((sliding / "config.json").read_text())
    (sliding / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    with pytest.raises(ValueError, match="sliding/config.json: sliding-window attention"):
        convert_hf_to_mcore(str(sliding), str(tmp_path / "out"))

    # Weights the name map does not know (Llama's o_proj bias) are refused, not dropped.
    from safetensors.torch import load_file, save_file

    extra = _copy(hf_dir, tmp_path / "extra")
    for name in os.listdir(extra):
        if name.endswith(".safetensors"):
            state = load_file(extra / name)
            if any(k.startswith("model.layers.0.") for k in state):
                state["model.layers.0.self_attn.o_proj.bias"] = state[next(iter(state))].flatten()[:64].clone()
                save_file(state, extra / name, metadata={"format": "pt"})
                index = json.loads((extra / "model.safetensors.index.json").read_text())
                index["weight_map"]["model.layers.0.self_attn.o_proj.bias"] = name
                (extra / "model.safetensors.index.json").write_text(json.dumps(index))
                break
    with pytest.raises(ValueError, match="tensor model.layers.0.self_attn.o_proj.bias \\(and 0 more\\) has no place "
                                         "in the llama name map"):
        convert_hf_to_mcore(str(extra), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    assert {key: os.environ.get(key) for key in world} == world  # no torch.distributed world was set up


def test_shape_mismatch_is_found_before_anything_is_written(batch):
    """Found once Megatron has built the model (in the batch's process), before anything is written."""
    err = batch["converted"]["mismatch"]
    assert isinstance(err, ValueError), err
    assert "shape mismatch: decoder.layers.0.mlp.linear_fc1.weight is (192, 64)" in str(err)
    root = batch["root"]
    assert not os.path.exists(root / "c") and not [p for p in os.listdir(root) if ".tmp-" in p]
