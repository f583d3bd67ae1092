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
import sys
import time

from sed_megatron import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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

    from sed_megatron.pipeline import save_tokenizer
    from sed_megatron.testing.tiny_hf import SPECIAL

    def lines():
        for path in corpus_files:
            with open(path) as f:
                for line in f:
                    record = json.loads(line)
                    yield record["question"] + " " + record["answer"]

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.train_from_iterator(lines(), trainers.WordLevelTrainer(special_tokens=SPECIAL))
    return save_tokenizer(backend, os.path.join(workdir, "tokenizer"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "quickstart"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-iters", type=int, default=300)
    parser.add_argument("--sft-iters", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=40)
    parser.add_argument("--check-readme", action="store_true",
                        help="exit 1 unless the table matches the README's (within README_TOLERANCE)")
    options = parser.parse_args()
    workdir = os.path.abspath(options.workdir)
    if os.path.exists(workdir) and os.listdir(workdir):
        sys.exit(f"quickstart: {workdir} is not empty (remove it or pass another --workdir)")
    os.makedirs(workdir, exist_ok=True)
    started = time.time()
    seed = options.seed

    print("[1/6] data and tokenizer", flush=True)
    data = make_data(workdir, seed, num_train=3000, num_eval=options.eval_prompts)
    tokenizer_dir, vocab_size = train_tokenizer(workdir, [data["base"], data["sft"]])
    for split in ("base", "sft"):
        pipeline.preprocess(data[split], tokenizer_dir, os.path.join(workdir, "data", split), prompt_key="question",
                            response_key="answer", seq_length=64)

    print("[2/6] random Llama -> Megatron", flush=True)
    hf_init = pipeline.random_llama(os.path.join(workdir, "hf_init"), tokenizer_dir, vocab_size, seed)
    pipeline.convert(workdir, hf_init, os.path.join(workdir, "ckpt_init"))

    def config(name, prefix, iters, loss):
        return pipeline.write_run_yaml(os.path.join(workdir, f"{name}.yaml"), data_prefix=prefix, iters=iters,
                                       seed=seed, loss=loss, tp=2)

    print("[3/6] initial model: CE on the first half", flush=True)
    base_yaml = config("base", os.path.join(workdir, "data", "base"), options.base_iters, {"kind": "ce"})
    ckpt_base = os.path.join(workdir, "ckpt_base")
    pipeline.train(workdir, "base", base_yaml, os.path.join(workdir, "ckpt_init"), ckpt_base, nproc=2)

    print("[4/6] tau calibration on the initial model (r = 0.7, k = 2)", flush=True)
    sft_prefix = os.path.join(workdir, "data", "sft")
    sed_yaml = config("sed", sft_prefix, options.sft_iters, {"kind": "sed", "top_k": 2, "lam": 1.0})
    calibrated = os.path.join(workdir, "sed_tau.yaml")
    tau = pipeline.calibrate_tau(workdir, sed_yaml, ckpt_base, calibrated, 0.7, nproc=2)
    print(f"      tau = {tau:.4f}", flush=True)

    print("[5/6] SFT with CE and with SED at TP=2", flush=True)
    ce_yaml = config("ce", sft_prefix, options.sft_iters, {"kind": "ce"})
    for name, path in (("ce", ce_yaml), ("sed", calibrated)):
        pipeline.train(workdir, name, path, ckpt_base, os.path.join(workdir, f"ckpt_{name}"), nproc=2)

    print("[6/6] export, sample, evaluate", flush=True)
    results = {
        name: pipeline.export_and_evaluate(workdir, name, os.path.join(workdir, f"ckpt_{name}"), hf_init, data["eval"],
                                           num_samples=options.num_samples, max_new_tokens=24, seed=seed)
        for name in ("ce", "sed")
    }
    pipeline.plot({label.upper(): os.path.join(workdir, f"ckpt_{label}", "metrics.jsonl") for label in ("ce", "sed")},
                  os.path.join(workdir, "curves.png"))

    k = results["ce"]["k"]
    rows = {name.upper(): [results[name][m] for m in ("self_bleu", "distinct_2", "pass_at_1", "pass_at_k", "final_ce")]
            for name in ("ce", "sed")}
    print(f"\nquickstart: {options.eval_prompts} held-out prompts x {options.num_samples} samples, "
          f"temperature 1.0, tau = {tau:.4f}, {time.time() - started:.0f} s")
    print(f"| loss | Self-BLEU (lower = more diverse) | distinct-2 | pass@1 | pass@{k} | final train CE |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    print(f"curves: {os.path.join(workdir, 'curves.png')}")
    if options.check_readme:
        check_readme(tau, rows)


README_TOLERANCE = {"tau": 0.002, "metric": 0.03}
"""How far a run under requirements/lock.txt may be from the README's table: reruns here are
bit-identical; another CPU may round its BLAS sums differently, which moves sampling a little."""


def check_readme(tau, rows):
    """Exit 1 with one line unless the README's quickstart table is this run's, within README_TOLERANCE."""
    import re

    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    readme_tau = float(re.search(r"quickstart: .*tau = ([\d.]+)", text).group(1))
    if abs(readme_tau - tau) > README_TOLERANCE["tau"]:
        sys.exit(f"quickstart: tau {tau:.4f} differs from the README's {readme_tau:.4f} by more than "
                 f"{README_TOLERANCE['tau']}")
    for name, values in rows.items():
        readme = [float(v) for v in re.search(rf"^\| {name} \| (.*) \|$", text, re.M).group(1).split(" | ")]
        for column, (got, want) in enumerate(zip(values, readme, strict=True)):
            if abs(got - want) > README_TOLERANCE["metric"]:
                sys.exit(f"quickstart: {name} column {column + 1} is {got:.3f}, the README says {want:.3f} "
                         f"(tolerance {README_TOLERANCE['metric']})")
    print(f"quickstart: the table matches the README's (tolerance {README_TOLERANCE})")


if __name__ == "__main__":
    from sed_megatron.launch import IsolatedError, StepFailed
    from sed_megatron.runtime import quiet_known_notices

    quiet_known_notices()  # Megatron's import-time notices about optional kernels

    try:
        main()
    except (StepFailed, IsolatedError, ValueError) as err:
        sys.exit(f"quickstart: a step failed: {err}")
