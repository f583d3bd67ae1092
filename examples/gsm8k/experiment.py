"""CE vs DFT vs GEM vs SED-SFT on GSM8K with a small model trained here, several seeds (docs/EXPERIMENTS.md).

    OMP_NUM_THREADS=1 .venv/bin/python examples/gsm8k/experiment.py --gsm8k-dir ../shared/data/gsm8k \
        --workdir runs/gsm8k

1. Splits GSM8K train in two halves (fixed seed), trains a byte-level BPE tokenizer on it.
2. A random Llama (hidden 128, 4 layers by default) becomes the "initial model" by CE on the
   first half: the paper starts SFT from an instruct model, which this stands in for.
3. τ from the initial model on the second half (r = 0.7, k = 2, the paper's setting).
4. For every seed and loss: SFT of the initial model on the second half (the seed changes
   the data order and the sampling), export to HF, n samples per GSM8K test prompt,
   Self-BLEU, distinct-n, pass@1 and pass@n (only a stated `#### x` answer counts), and the
   share of samples that state an answer at all. sed_all is an ablation: SED's penalty on
   every token instead of the calibrated mask.
5. Prints the table (mean ± sample std over seeds) and writes results.json.
A finished run is kept: running again with the same --workdir skips what it already has.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

from sed_megatron import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOSSES = {
    "ce": {"kind": "ce"},
    "dft": {"kind": "dft"},
    "gem": {"kind": "gem"},
    "sed": {"kind": "sed", "top_k": 2, "lam": 1.0},
    # Ablation: the penalty on every token. (p - 0.5)^2 opposes CE only where p > 0.5, and the
    # calibrated mask selects tokens with p <= P_topk < tau; with tau < 0.5 it never opposes CE.
    "sed_all": {"kind": "sed", "lam": 1.0, "mask": "none"},
}
METRICS = ("self_bleu", "distinct_2", "pass_at_1", "pass_at_k", "final_ce", "answered")


def split_train(gsm8k_dir, workdir, eval_prompts):
    """base.jsonl / sft.jsonl (halves of train, seeded) and eval.jsonl (the first test prompts)."""
    paths = {name: os.path.join(workdir, f"{name}.jsonl") for name in ("base", "sft", "eval")}
    with open(os.path.join(gsm8k_dir, "train.jsonl")) as f:
        train_lines = [line for line in f if line.strip()]
    with open(os.path.join(gsm8k_dir, "test.jsonl")) as f:
        test_lines = [line for line in f if line.strip()][:eval_prompts]
    random.Random(0).shuffle(train_lines)
    half = len(train_lines) // 2
    for name, lines in (("base", train_lines[:half]), ("sft", train_lines[half:]), ("eval", test_lines)):
        with open(paths[name], "w") as f:
            f.writelines(lines)
    return paths


def train_tokenizer(workdir, corpus, vocab_size):
    """Byte-level BPE (exact round trip of the text, digits included) with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from sed_megatron.pipeline import save_tokenizer
    from sed_megatron.testing.tiny_hf import SPECIAL

    def texts():
        with open(corpus) as f:
            for line in f:
                record = json.loads(line)
                yield record["question"] + "\n" + record["answer"]

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return save_tokenizer(backend, os.path.join(workdir, "tokenizer"))


def summarize(results, losses, seeds):
    """{loss: {metric: (mean, std)}} over seeds."""
    table = {}
    for loss in losses:
        runs = [results[f"{loss}_s{seed}"] for seed in seeds]
        table[loss] = {m: (statistics.fmean(r[m] for r in runs),
                           statistics.stdev(r[m] for r in runs) if len(runs) > 1 else 0.0) for m in METRICS}
    return table


def main():
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gsm8k-dir", required=True, help="holds train.jsonl and test.jsonl (question, answer)")
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "gsm8k"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", choices=sorted(LOSSES), default=["ce", "dft", "gem", "sed", "sed_all"])
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=512, help="packed rows of this many tokens")
    parser.add_argument("--base-iters", type=int, default=250)
    parser.add_argument("--sft-iters", type=int, default=80)
    parser.add_argument("--lr", type=float, default=2.0e-3, help="base training; SFT uses a quarter of it")
    parser.add_argument("--eval-prompts", type=int, default=100, help="first N GSM8K test questions")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=1, help="tensor-parallel processes per run")
    options = parser.parse_args()
    workdir = os.path.abspath(options.workdir)
    os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
    started = time.time()

    def done(path):
        return os.path.exists(path)

    print("[1/4] data, tokenizer, initial model", flush=True)
    data = split_train(options.gsm8k_dir, workdir, options.eval_prompts)
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    if not done(tokenizer_dir):
        train_tokenizer(workdir, data["base"], options.vocab_size)
    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    for split in ("base", "sft"):
        if not done(os.path.join(workdir, "data", f"{split}.idx")):
            pipeline.preprocess(data[split], tokenizer_dir, os.path.join(workdir, "data", split),
                                prompt_key="question", response_key="answer", seq_length=options.seq_length,
                                truncation="skip")
    hf_init = os.path.join(workdir, "hf_init")
    if not done(hf_init):
        pipeline.random_llama(hf_init, tokenizer_dir, vocab_size, 0, hidden=options.hidden, ffn=3 * options.hidden,
                     layers=options.layers, max_positions=options.seq_length)
    ckpt_init, ckpt_base = os.path.join(workdir, "ckpt_init"), os.path.join(workdir, "ckpt_base")
    if not done(ckpt_init):
        pipeline.convert(workdir, hf_init, ckpt_init)

    def config(name, prefix, iters, seed, loss, lr):
        return pipeline.write_run_yaml(os.path.join(workdir, f"{name}.yaml"), data_prefix=prefix, iters=iters,
                                       seed=seed, loss=loss, tp=options.nproc, micro_batch=4, global_batch=16,
                                       seq_length=options.seq_length, lr=lr, pack=True)

    if not pipeline.trained_to(ckpt_base, options.base_iters):  # a base run cut short trains again
        base_yaml = config("base", os.path.join(workdir, "data", "base"), options.base_iters, 0, LOSSES["ce"], options.lr)
        base_started = time.time()
        pipeline.train(workdir, "base", base_yaml, ckpt_init, ckpt_base, options.nproc)
        print(f"      initial model: {options.base_iters} iterations of CE in {time.time() - base_started:.0f} s",
              flush=True)

    print("[2/4] tau of the initial model on the SFT half (r = 0.7, k = 2)", flush=True)
    sft_prefix = os.path.join(workdir, "data", "sft")
    sft_lr = options.lr / 4
    def calibrate():
        probe = config("sed_probe", sft_prefix, options.sft_iters, 0, LOSSES["sed"], sft_lr)
        return {"tau": pipeline.calibrate_tau(workdir, probe, ckpt_base, os.path.join(workdir, "sed_probe_tau.yaml"),
                                              0.7, options.nproc)}

    tau = pipeline.cached_json(os.path.join(workdir, "tau.json"), calibrate)["tau"]
    print(f"      tau = {tau:.4f}", flush=True)

    print(f"[3/4] SFT x {len(options.losses)} losses x {len(options.seeds)} seeds, export, evaluate", flush=True)
    results = {}
    for seed in options.seeds:
        for loss in options.losses:
            name = f"{loss}_s{seed}"

            def run(name=name, loss=loss, seed=seed):
                run_started = time.time()
                spec = {**LOSSES[loss], "tau": tau} if loss == "sed" else LOSSES[loss]
                ckpt = os.path.join(workdir, f"ckpt_{name}")
                pipeline.train(workdir, name, config(name, sft_prefix, options.sft_iters, seed, spec, sft_lr),
                               ckpt_base, ckpt, options.nproc, resume_iters=options.sft_iters)
                result = pipeline.export_and_evaluate(workdir, name, ckpt, hf_init, data["eval"],
                                                      num_samples=options.num_samples,
                                                      max_new_tokens=options.max_new_tokens, seed=seed,
                                                      batch_prompts=25, strict_answers=True)
                print(f"      {name}: {time.time() - run_started:.0f} s", flush=True)
                return {m: result[m] for m in METRICS + ("k",)}

            results[name] = pipeline.cached_json(os.path.join(workdir, f"result_{name}.json"), run)
            print(f"      {name}: " + ", ".join(f"{m} {results[name][m]:.3f}" for m in METRICS), flush=True)

    print("[4/4] table", flush=True)
    table = summarize(results, options.losses, options.seeds)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"tau": tau, "options": vars(options), "runs": results, "table": table}, f, indent=1)
    k = options.num_samples
    print(f"\nGSM8K: {options.eval_prompts} test prompts x {k} samples, temperature 1.0, tau = {tau:.4f}, "
          f"seeds {options.seeds}, mean ± std, {time.time() - started:.0f} s")
    print(f"| loss | Self-BLEU (lower = more diverse) | distinct-2 | pass@1 | pass@{k} | final train CE | answered |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for loss in options.losses:
        cells = " | ".join(f"{table[loss][m][0]:.3f} ± {table[loss][m][1]:.3f}" for m in METRICS)
        print(f"| {loss.upper()} | {cells} |")
    return 0


if __name__ == "__main__":
    from sed_megatron.launch import IsolatedError, StepFailed
    from sed_megatron.runtime import quiet_known_notices

    quiet_known_notices()  # Megatron's import-time notices about optional kernels

    try:
        sys.exit(main())
    except (StepFailed, IsolatedError, ValueError) as err:
        sys.exit(f"gsm8k experiment: a step failed: {err}")
