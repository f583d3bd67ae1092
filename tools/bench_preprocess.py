"""Preprocessing throughput and memory on generated chat samples: 1, 2 and all workers, and Megatron-LM's style.

    python tools/bench_preprocess.py --tokenizer SMOLLM2_HF_DIR --samples 200000 --workdir /tmp/bench_preprocess

Generates N chat samples (JSON lines of `messages`; token lengths log-normal with p50 600 and p90 4,000,
clipped to 31,000, and one sample of ~31,900 tokens: the length mix of long-reasoning SFT data), then
runs `tools/preprocess_sft_data.py` on them as a fresh process per worker count and reports samples/s,
tokens/s, wall time and the peak resident memory of the process tree (the sum over the driver and its
workers, sampled every 0.1 s; shared pages count once per process, so it overstates). The outputs of all
worker counts must be byte-identical (checked by hash). For comparison, the same texts without a chat
template ({"text": ...}, one per line) go through Megatron-LM's tools/preprocess_data.py loop, reproduced
here without Megatron-LM's training arguments: a fork Pool's imap(encode, lines, 32) of json.loads +
the tokenizer + EOD, every document sent back to the parent, which writes it with IndexedDatasetBuilder.
Finally a profile of one process on the first samples splits the time between reading JSON, rendering
the chat template, the tokenizer and writing. The generated files are kept in --workdir for reruns.
"""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

P50, P90, CLIP, LONGEST = 600, 4000, 31000, 31900


def parse_args(argv):
    from sed_megatron.utils import help_sections

    parser = argparse.ArgumentParser(prog="bench_preprocess.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     **help_sections(__doc__))
    parser.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory (SmolLM2's)")
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--workdir", default="/tmp/bench_preprocess")
    parser.add_argument("--workers", default="1,2,all", help="worker counts to run (all: one per CPU)")
    parser.add_argument("--no-megatron-style", action="store_true", help="skip Megatron-LM's style of run")
    parser.add_argument("--profile-samples", type=int, default=1000, help="samples profiled in one process (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--megatron-style-run", nargs=4, metavar=("INPUT", "TOKENIZER", "PREFIX", "WORKERS"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- data ---------------------------------------------------------------------------------------------------------


def _words(tokenizer):
    """Whole-word tokens of the vocabulary, frequent (low id) first: text that tokenizes like prose."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return [token[1:] for token, _ in vocab if token.startswith("\u0120") and token[1:].isalpha() and len(token) > 2]


def generate(tokenizer_dir, n, seed, chats_path, text_path):
    """chats.jsonl ({"messages": ...}) and text.jsonl ({"text": ...}) of n samples; returns the
    target token lengths' p50 / p90 / max."""
    import numpy
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = numpy.random.default_rng(seed)
    words = numpy.array(_words(tokenizer))
    weights = 1.0 / (numpy.arange(len(words)) + 50.0)
    corpus_words = words[rng.choice(len(words), size=4_000_000, p=weights / weights.sum())]
    for i in range(0, len(corpus_words), 17):  # sentences
        corpus_words[i] = corpus_words[i].capitalize()
    corpus = " ".join(corpus_words.tolist()).replace(" The ", ". The ")
    probe = corpus[:200_000]
    tokens_per_char = len(tokenizer(probe, add_special_tokens=False)["input_ids"]) / len(probe)

    sigma = math.log(P90 / P50) / 1.2815515655446004  # the normal's 90th percentile
    lengths = numpy.minimum(numpy.exp(rng.normal(math.log(P50), sigma, size=n)), CLIP).astype(int)
    lengths = numpy.maximum(lengths, 40)
    lengths[n // 2] = LONGEST

    def text(tokens):
        chars = int(tokens / tokens_per_char)
        start = int(rng.integers(0, len(corpus) - chars - 1))
        start = corpus.find(" ", start) + 1
        return corpus[start:start + chars].strip()

    with open(chats_path + ".tmp", "w") as chats, open(text_path + ".tmp", "w") as plain:
        for i, length in enumerate(lengths.tolist()):
            template = 40  # the chat template's own tokens, about
            body = max(length - template, 20)
            turns = 2 if i % 10 == 0 and body > 200 else 1
            messages = [{"role": "system", "content": text(20)}] if i % 3 == 0 else []
            for _ in range(turns):
                prompt = max(8, int(body / turns * rng.uniform(0.05, 0.3)))
                messages += [{"role": "user", "content": text(prompt)},
                             {"role": "assistant", "content": text(body / turns - prompt)}]
            chats.write(json.dumps({"messages": messages}) + "\n")
            plain.write(json.dumps({"text": "\n".join(m["content"] for m in messages)}) + "\n")
    os.replace(chats_path + ".tmp", chats_path)
    os.replace(text_path + ".tmp", text_path)


# -- runs ---------------------------------------------------------------------------------------------------------


def measured(command):
    """(exit code, wall seconds, peak RSS of the process tree in bytes, stdout, stderr)."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    root, peak = psutil.Process(proc.pid), 0
    import threading

    output = {}
    reader = threading.Thread(target=lambda: output.update(zip(("out", "err"), proc.communicate())))
    reader.start()
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            rss = 0
            for process in tree:
                try:
                    rss += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    reader.join()
    return proc.returncode, time.perf_counter() - started, peak, output.get("out", ""), output.get("err", "")


def digest(prefix):
    h = hashlib.sha256()
    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx"):
        with open(prefix + suffix, "rb") as f:
            while block := f.read(16 << 20):
                h.update(block)
    return h.hexdigest()[:16]


def remove(prefix):
    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx", "_text_document.bin", "_text_document.idx"):
        if os.path.exists(prefix + suffix):
            os.remove(prefix + suffix)


_encoder = {}


def _megatron_init(tokenizer_dir):
    from transformers import AutoTokenizer

    _encoder["tokenizer"] = AutoTokenizer.from_pretrained(tokenizer_dir)


def _megatron_encode(line):
    """Megatron-LM's Encoder.encode for one --json-keys text with --append-eod (HuggingFaceTokenizer.tokenize)."""
    tokenizer = _encoder["tokenizer"]
    ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
    if ids:
        ids.append(tokenizer.eos_token_id)
    return {"text": ids}, {"text": [len(ids)] if ids else []}, len(line)


def megatron_style_run(input_path, tokenizer_dir, prefix, workers):
    """Megatron-LM tools/preprocess_data.py's Partition.process_json_file loop."""
    import multiprocessing

    from megatron.core.datasets import indexed_dataset

    _megatron_init(tokenizer_dir)
    builder = indexed_dataset.IndexedDatasetBuilder(
        prefix + "_text_document.bin", dtype=indexed_dataset.DType.optimal_dtype(len(_encoder["tokenizer"])))
    documents = tokens = 0
    with open(input_path, encoding="utf-8") as fin:
        pool = multiprocessing.get_context("fork").Pool(int(workers), initializer=_megatron_init,
                                                        initargs=(tokenizer_dir,))
        for doc, lens, _ in pool.imap(_megatron_encode, fin, 32):
            builder.add_document(doc["text"], lens["text"])
            documents += 1
            tokens += len(doc["text"])
        pool.close()
        pool.join()
    builder.finalize(prefix + "_text_document.idx")
    print(json.dumps({"samples": documents, "tokens": tokens}))


def profile(tokenizer_dir, chats_path, samples, workdir):
    """Shares of one process's time: JSON, chat template, tokenizer, writing (the rest: Python around them)."""
    import cProfile
    import pstats

    from sed_megatron.data.sft_preprocess import PreprocessConfig, preprocess

    head = os.path.join(workdir, f"head_{samples}.jsonl")
    with open(chats_path) as fin, open(head, "w") as fout:
        for _, line in zip(range(samples), fin):
            fout.write(line)
    cfg = PreprocessConfig(input=head, tokenizer=tokenizer_dir, output_prefix=os.path.join(workdir, "profile", "ds"),
                           truncation="skip")
    profiler = cProfile.Profile()
    profiler.enable()
    preprocess(cfg, progress=False, resume=False)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    cumulative = {f"{os.path.basename(file)}:{name}": ct for (file, _, name), (_, _, _, ct, _) in stats.items()}
    total = cumulative.get("preprocess_run.py:run_unit", 0.0)
    parts = {"JSON": cumulative.get("sft_preprocess.py:_record", 0.0),
             "chat template": cumulative.get("sft_preprocess.py:_render", 0.0),
             "tokenizer": cumulative.get("sft_preprocess.py:_encode", 0.0),
             "writing": cumulative.get("preprocess_run.py:add", 0.0)}
    remove(os.path.join(workdir, "profile", "ds"))
    return total, parts


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.megatron_style_run:
        megatron_style_run(*args.megatron_style_run)
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    chats = os.path.join(args.workdir, f"chats_{args.samples}_{args.seed}.jsonl")
    plain = os.path.join(args.workdir, f"text_{args.samples}_{args.seed}.jsonl")
    if not (os.path.exists(chats) and os.path.exists(plain)):
        started = time.perf_counter()
        generate(args.tokenizer, args.samples, args.seed, chats, plain)
        print(f"generated {args.samples} samples in {time.perf_counter() - started:.0f} s "
              f"({os.path.getsize(chats) / 2**20:.0f} MiB)", flush=True)
    cpus = os.cpu_count()
    counts = sorted({cpus if w == "all" else int(w) for w in args.workers.split(",")})
    rows, digests = [], {}
    print(f"machine: {cpus} CPUs, load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    for workers in counts:
        prefix = os.path.join(args.workdir, f"out_{workers}", "ds")
        code, wall, peak, out, err = measured([sys.executable, os.path.join(REPO, "tools", "preprocess_sft_data.py"),
                                               "--input", chats, "--tokenizer", args.tokenizer, "--output-prefix",
                                               prefix, "--workers", str(workers), "--truncation", "skip", "--quiet"])
        if code != 0:
            sys.exit(f"bench_preprocess.py: preprocess_sft_data.py --workers {workers} failed: {err[-2000:]}")
        summary = json.loads(out.strip().splitlines()[-1])
        digests[workers] = digest(prefix)
        remove(prefix)
        rows.append(("preprocess_sft_data.py (chat template, loss mask)", workers, summary, wall, peak))
        print(json.dumps({"run": "sed", "workers": workers, "wall_s": round(wall, 1), "peak_rss_mib": peak >> 20,
                          **summary}), flush=True)
    if not args.no_megatron_style:
        for workers in counts:
            prefix = os.path.join(args.workdir, f"megatron_{workers}", "ds")
            os.makedirs(os.path.dirname(prefix), exist_ok=True)
            code, wall, peak, out, err = measured([sys.executable, os.path.abspath(__file__), "--tokenizer",
                                                   args.tokenizer, "--megatron-style-run", plain, args.tokenizer,
                                                   prefix, str(workers)])
            if code != 0:
                sys.exit(f"bench_preprocess.py: the Megatron-style run failed: {err[-2000:]}")
            summary = json.loads(out.strip().splitlines()[-1])
            remove(prefix)
            rows.append(("Megatron-LM preprocess_data.py style (text, no template)", workers, summary, wall, peak))
            print(json.dumps({"run": "megatron_style", "workers": workers, "wall_s": round(wall, 1),
                              "peak_rss_mib": peak >> 20, **summary}), flush=True)

    print()
    print("| run | workers | samples/s | tokens/s | wall | peak RSS (tree) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, workers, summary, wall, peak in rows:
        print(f"| {name} | {workers} | {summary['samples'] / wall:,.0f} | {summary['tokens'] / wall / 1e6:.2f} M | "
              f"{wall:.0f} s | {peak / 2**30:.2f} GiB |")
    first = rows[0][2]
    if "lengths" in first:
        print(f"\nkept {first['samples']} samples, {first['tokens']} tokens ({first['loss_tokens']} with loss), "
              f"lengths p50 {first['lengths']['p50']}, p90 {first['lengths']['p90']}, max {first['lengths']['max']}; "
              f"dropped {first['skipped']}")
    same = len(set(digests.values())) == 1
    print(f"outputs of {', '.join(map(str, digests))} workers: {'byte-identical' if same else 'DIFFERENT'} "
          f"({next(iter(digests.values()))})")
    if args.profile_samples:
        total, parts = profile(args.tokenizer, chats, min(args.profile_samples, args.samples), args.workdir)
        shares = ", ".join(f"{name} {seconds / total:.0%}" for name, seconds in parts.items())
        print(f"one process, first {min(args.profile_samples, args.samples)} samples (cProfile, {total:.1f} s): "
              f"{shares}, the rest {1 - sum(parts.values()) / total:.0%}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
