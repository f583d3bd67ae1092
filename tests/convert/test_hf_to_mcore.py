"""tools/convert_hf_to_mcore.py and tools/compare_hf_mcore.py on tiny random models (CPU, gloo)."""

import json
import os
import subprocess
import sys

import pytest

from sed_megatron.testing.tiny_hf import tiny_hf_model
from sed_megatron.utils import free_port

from ..training.launch import REPO, TINY, _env, train

CONVERT = os.path.join(REPO, "tools", "convert_hf_to_mcore.py")
COMPARE = os.path.join(REPO, "tools", "compare_hf_mcore.py")


def save_hf(directory, variant, shard="50KB"):
    tiny_hf_model(variant).save_pretrained(directory, max_shard_size=shard)
    return str(directory)


def convert(hf_dir, save, *flags):
    return subprocess.run([sys.executable, CONVERT, "--hf-dir", hf_dir, "--save", save, *flags], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)


def compare(hf_dir, ckpt, tp):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run([torchrun, "--nproc_per_node", str(tp), "--master_port", str(free_port()), COMPARE,
                          "--hf-dir", hf_dir, "--load", ckpt, "--tp", str(tp)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_logit_diff=")
    return float(last.split("=")[1])


@pytest.mark.parametrize("variant,tps", [("llama_gqa_untied", (1, 2)), ("llama_gqa_tied", (2,)),
                                         ("qwen2_bias", (2,)), ("llama_rope_scaling", (2,))])
def test_converted_logits_equal_transformers(tmp_path, variant, tps):
    hf_dir = save_hf(tmp_path / "hf", variant)
    out = convert(hf_dir, str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr[-3000:]
    for tp in tps:
        # fp32 on both sides, another summation order: ~1e-6.
        assert compare(hf_dir, str(tmp_path / "ckpt"), tp) < 1e-4


def test_training_loads_the_converted_checkpoint_at_any_layout(tmp_path):
    import yaml

    hf_dir = save_hf(tmp_path / "hf", "llama_gqa_untied")
    ckpt = str(tmp_path / "ckpt")
    assert convert(hf_dir, ckpt).returncode == 0
    with open(TINY) as f:
        run = yaml.safe_load(f)
    del run["model"]  # the architecture comes from the checkpoint
    run["training"]["seq_length"] = 64
    run["checkpoint"] = {}
    config = str(tmp_path / "run.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(run, f)
    flags = ["--load", ckpt, "--finetune", "--no-load-optim", "--no-load-rng", "--train-iters", "2", "--save", "",
             "--sed-tau", "0.05", "--sft-num-samples", "16"]
    first = {}
    for name, nproc, layout in (("tp1", 1, ["--tensor-model-parallel-size", "1"]),
                                ("pp2", 2, ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"])):
        records = train(str(tmp_path / name), nproc, flags + layout, config=config)
        first[name] = records[0]["ce_loss"]
    # The converted random model: CE near log(120) over the real vocabulary, not log(1024).
    assert first["pp2"] == pytest.approx(first["tp1"], rel=1e-5)
    assert 4.5 < first["tp1"] < 5.1


def test_bad_inputs(tmp_path):
    import transformers

    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    out = convert(str(gpt2), str(tmp_path / "a"))
    assert out.returncode == 2
    assert "unsupported model_type 'gpt2'; supported: llama, mistral, qwen2" in out.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "a")

    hf_dir = save_hf(tmp_path / "hf", "llama_gqa_untied")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    out = convert(hf_dir, str(tmp_path / "full"))
    assert out.returncode == 2 and "output directory is not empty (use --overwrite)" in out.stderr

    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    broken = tmp_path / "broken"
    os.system(f"cp -r {hf_dir} {broken}")
    os.remove(broken / shard)
    out = convert(str(broken), str(tmp_path / "b"))
    assert out.returncode == 2 and f"{shard}: shard listed in the index is missing" in out.stderr
    assert not os.path.exists(tmp_path / "b")

    corrupt = tmp_path / "corrupt"
    os.system(f"cp -r {hf_dir} {corrupt}")
    with open(corrupt / shard, "r+b") as f:
        f.truncate(100)
    out = convert(str(corrupt), str(tmp_path / "d"))
    assert out.returncode == 2 and f"{shard}: cannot read the shard" in out.stderr
    assert not os.path.exists(tmp_path / "d")

    from sed_megatron.testing.tiny_hf import make_tokenizer

    big_vocab = tmp_path / "big_vocab"
    os.system(f"cp -r {hf_dir} {big_vocab}")
    make_tokenizer(str(big_vocab), [f"w{i}" for i in range(130)])
    out = convert(str(big_vocab), str(tmp_path / "e"))
    assert out.returncode == 2 and "vocab_size 120 is smaller than the tokenizer's 148 tokens" in out.stderr

    mismatch = tmp_path / "mismatch"
    os.system(f"cp -r {hf_dir} {mismatch}")
    with open(mismatch / "config.json") as f:
        config = json.load(f)
    config["intermediate_size"] = 80
    with open(mismatch / "config.json", "w") as f:
        json.dump(config, f)
    out = convert(str(mismatch), str(tmp_path / "c"))
    assert out.returncode == 2 and "shape mismatch: decoder.layers.0.mlp.linear_fc1.weight" in out.stderr
    assert not os.path.exists(tmp_path / "c")
