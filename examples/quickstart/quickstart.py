"""CPU quickstart, end to end: SFT with CE and with SED-SFT on a task with several valid solutions.

    bash launch/quickstart_cpu.sh            # installs what it needs, then runs this
    python examples/quickstart/quickstart.py --workdir runs/quickstart [--seed 0]

1. Generates arithmetic word problems whose answer can be reached along several orders of
   steps (so diversity among correct samples is measurable), and held-out prompts.
2. Trains a word-level tokenizer on them and builds a small random Llama (transformers).
3. Converts it to Megatron, fine-tunes it with CE on one half of the data (the "initial
   model" the paper starts from), calibrates τ on it (r = 0.7, k = 2).
4. Fine-tunes the initial model on the other half with CE and with SED at TP=2.
5. Exports both to Hugging Face, samples n responses per held-out prompt with transformers,
   and prints Self-BLEU, distinct-n, pass@1, pass@k and the final CE; plots the curves.
Everything is seeded; nothing is downloaded.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
NAMES = ["Tom", "Ana", "Lee", "Mia", "Sam", "Zoe"]
ITEMS = ["apples", "books", "coins", "pens", "cards", "shells"]


def problem(rng):
    """A question and its three solution paths (every path is correct)."""
    a, b, c = rng.randint(3, 12), rng.randint(2, 9), rng.randint(1, 2)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    question = f"{name} has {a} {item} , finds {b} more and gives away {c} . How many {item} now ?"
    total = a + b - c
    paths = [
        f"{a} + {b} = {a + b} . {a + b} - {c} = {total} . #### {total}",
        f"{a} - {c} = {a - c} . {a - c} + {b} = {total} . #### {total}",
        f"{b} - {c} = {b - c} . {a} + {b - c} = {total} . #### {total}",
    ]
    return question, paths, total


def make_data(workdir, seed, num_train, num_eval):
    rng = random.Random(seed)
    splits = {"base": [], "sft": [], "eval": []}
    for _ in range(num_train):
        question, paths, _ = problem(rng)
        # Each training sample shows one path: the data itself holds several valid solutions.
        splits["base" if rng.random() < 0.5 else "sft"].append({"question": question, "answer": rng.choice(paths)})
    for _ in range(num_eval):
        question, _, total = problem(rng)
        splits["eval"].append({"question": question, "answer": f"#### {total}"})
    paths = {}
    for name, records in splits.items():
        paths[name] = os.path.join(workdir, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


def train_tokenizer(workdir, corpus_files):
    """A word-level tokenizer trained on the generated corpus, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sed_megatron.testing.tiny_hf import CHAT_TEMPLATE, SPECIAL

    def lines():
        for path in corpus_files:
            with open(path) as f:
                for line in f:
                    record = json.loads(line)
                    yield record["question"] + " " + record["answer"]

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.train_from_iterator(lines(), trainers.WordLevelTrainer(special_tokens=SPECIAL))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", additional_special_tokens=SPECIAL[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    directory = os.path.join(workdir, "tokenizer")
    tokenizer.save_pretrained(directory)
    return directory, len(tokenizer)


def make_model(workdir, tokenizer_dir, vocab_size, seed):
    import torch
    import transformers

    end_of_turn = transformers.AutoTokenizer.from_pretrained(tokenizer_dir).convert_tokens_to_ids("<|end|>")
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=end_of_turn, pad_token_id=0,  # a response ends with the turn
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory = os.path.join(workdir, "hf_init")
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


def run(cmd, log_path, env=None):
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "TORCHDYNAMO_DISABLE": "1", **(env or {})})
    if proc.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-4000:]
        sys.exit(f"quickstart: step failed ({' '.join(cmd[:4])} ...), log {log_path}:\n{tail}")
    return time.time() - started


def run_yaml(workdir, name, data_prefix, iters, seed, extra_loss):
    import yaml

    config = {
        "parallel": {"tensor_model_parallel_size": 2},
        "training": {"micro_batch_size": 8, "global_batch_size": 16, "train_iters": iters, "seed": 1234 + seed,
                     "seq_length": 64, "eval_iters": 0, "eval_interval": 100000},
        "optimizer": {"lr": 2.0e-3, "min_lr": 2.0e-4, "lr_decay_style": "cosine", "lr_warmup_iters": min(10, iters // 5),
                      "adam_beta2": 0.95, "weight_decay": 0.0, "clip_grad": 1.0},
        "checkpoint": {"save_interval": iters},
        "logging": {"log_interval": 5},
        "loss": extra_loss,
        "data": {"kind": "indexed", "path": data_prefix, "valid_fraction": 0.05, "seed": seed},
    }
    path = os.path.join(workdir, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "quickstart"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-iters", type=int, default=300)
    parser.add_argument("--sft-iters", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=40)
    options = parser.parse_args()
    workdir = os.path.abspath(options.workdir)
    if os.path.exists(workdir) and os.listdir(workdir):
        sys.exit(f"quickstart: {workdir} is not empty (remove it or pass another --workdir)")
    os.makedirs(workdir, exist_ok=True)
    sys.path.insert(0, REPO)
    started = time.time()
    seed = options.seed

    print("[1/6] data and tokenizer", flush=True)
    data = make_data(workdir, seed, num_train=3000, num_eval=options.eval_prompts)
    tokenizer_dir, vocab_size = train_tokenizer(workdir, [data["base"], data["sft"]])
    for split in ("base", "sft"):
        run([PYTHON, "tools/preprocess_sft_data.py", "--input", data[split], "--tokenizer", tokenizer_dir,
             "--output-prefix", os.path.join(workdir, "data", split), "--prompt-key", "question",
             "--response-key", "answer", "--seq-length", "64", "--no-progress"], os.path.join(workdir, f"prep_{split}.log"))

    print("[2/6] random Llama -> Megatron", flush=True)
    hf_init = make_model(workdir, tokenizer_dir, vocab_size, seed)
    run([PYTHON, "tools/convert_hf_to_mcore.py", "--hf-dir", hf_init, "--save", os.path.join(workdir, "ckpt_init")],
        os.path.join(workdir, "convert.log"))

    print("[3/6] initial model: CE on the first half", flush=True)
    torchrun = [TORCHRUN, "--nproc_per_node", "2", "-m", "sed_megatron.train"]
    base_yaml = run_yaml(workdir, "base", os.path.join(workdir, "data", "base"), options.base_iters, seed, {"kind": "ce"})
    run(torchrun + ["--config", base_yaml, "--load", os.path.join(workdir, "ckpt_init"), "--finetune", "--no-load-optim",
                    "--no-load-rng", "--save", os.path.join(workdir, "ckpt_base")], os.path.join(workdir, "base.log"))

    print("[4/6] tau calibration on the initial model (r = 0.7, k = 2)", flush=True)
    sed_loss = {"kind": "sed", "top_k": 2, "lam": 1.0}
    sft_prefix = os.path.join(workdir, "data", "sft")
    sed_yaml = run_yaml(workdir, "sed", sft_prefix, options.sft_iters, seed, sed_loss)
    calibrated = os.path.join(workdir, "sed_tau.yaml")
    run([TORCHRUN, "--nproc_per_node", "2", "tools/calibrate_tau.py", "--config", sed_yaml, "--mask-ratio", "0.7",
         "--load", os.path.join(workdir, "ckpt_base"), "--write-config", calibrated], os.path.join(workdir, "tau.log"))
    with open(os.path.join(workdir, "tau.log")) as f:
        tau = float(f.read().strip().splitlines()[-1].split("=")[1])
    print(f"      tau = {tau:.4f}", flush=True)

    print("[5/6] SFT with CE and with SED at TP=2", flush=True)
    ce_yaml = run_yaml(workdir, "ce", sft_prefix, options.sft_iters, seed, {"kind": "ce"})
    for name, config in (("ce", ce_yaml), ("sed", calibrated)):
        run(torchrun + ["--config", config, "--load", os.path.join(workdir, "ckpt_base"), "--finetune",
                        "--no-load-optim", "--no-load-rng", "--save", os.path.join(workdir, f"ckpt_{name}")],
            os.path.join(workdir, f"{name}.log"))

    print("[6/6] export, sample, evaluate", flush=True)
    results = {}
    for name in ("ce", "sed"):
        hf_dir = os.path.join(workdir, f"hf_{name}")
        run([PYTHON, "tools/convert_mcore_to_hf.py", "--load", os.path.join(workdir, f"ckpt_{name}"), "--save", hf_dir,
             "--hf-template", hf_init], os.path.join(workdir, f"export_{name}.log"))
        out = os.path.join(workdir, f"eval_{name}.json")
        run([PYTHON, "tools/eval_diversity.py", "--hf-dir", hf_dir, "--prompts", data["eval"], "--prompt-key",
             "question", "--num-samples", str(options.num_samples), "--max-new-tokens", "24", "--temperature", "1.0",
             "--seed", str(seed), "--out", out], os.path.join(workdir, f"eval_{name}.log"))
        with open(out) as f:
            results[name] = json.load(f)
        with open(os.path.join(workdir, f"ckpt_{name}", "metrics.jsonl")) as f:
            results[name]["final_ce"] = [json.loads(line) for line in f][-1]["ce_loss"]
    run([PYTHON, "tools/plot_metrics.py", f"CE={os.path.join(workdir, 'ckpt_ce', 'metrics.jsonl')}",
         f"SED={os.path.join(workdir, 'ckpt_sed', 'metrics.jsonl')}", "--out", os.path.join(workdir, "curves.png")],
        os.path.join(workdir, "plot.log"))

    k = results["ce"]["k"]
    print(f"\nquickstart: {options.eval_prompts} held-out prompts x {options.num_samples} samples, "
          f"temperature 1.0, tau = {tau:.4f}, {time.time() - started:.0f} s")
    print(f"| loss | Self-BLEU (lower = more diverse) | distinct-2 | pass@1 | pass@{k} | final train CE |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("ce", "sed"):
        r = results[name]
        print(f"| {name.upper()} | {r['self_bleu']:.3f} | {r['distinct_2']:.3f} | {r['pass_at_1']:.3f} | "
              f"{r['pass_at_k']:.3f} | {r['final_ce']:.3f} |")
    print(f"curves: {os.path.join(workdir, 'curves.png')}")


if __name__ == "__main__":
    main()
