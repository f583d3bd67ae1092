"""Sample several responses per prompt and measure diversity (Self-BLEU, distinct-n) and accuracy (pass@k).

    python tools/eval_diversity.py --hf-dir HF_DIR --prompts test.jsonl --num-samples 8 --out result.json
    python tools/eval_diversity.py --hf-dir HF_DIR --prompts gsm8k/test.jsonl --prompt-key question \\
        --answer-key answer --num-samples 16 --k 8 --max-new-tokens 512 --out gsm8k.json

Prompts: JSON lines with a prompt field (text, or a `messages` list) and optionally a reference
answer (`#### 42`, `\\boxed{42}` or a bare value). Generation: transformers on the CPU or one
GPU, or vLLM (--backend vllm, when installed). The prompt goes through the tokenizer's chat
template when it has one (--no-chat-template: raw text). Metric definitions:
sed_megatron/eval/metrics.py. RESULT.json holds the means (self_bleu, distinct_1/2/3,
pass_at_1, pass_at_k) and, per prompt, the samples and their scores.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sed_megatron.data.jsonl import read_jsonl  # noqa: E402
from sed_megatron.eval.metrics import evaluate  # noqa: E402

PROG = "eval_diversity.py"


def read_prompts(path, prompt_key, answer_key, limit):
    """(prompts, reference answers or None): a prompt is its text or its `messages` list."""
    def parse(record):
        return record["messages"] if "messages" in record else record[prompt_key], record.get(answer_key)

    prompts, answers = zip(*read_jsonl(path, parse, limit))
    return list(prompts), list(answers)


def render(tokenizer, prompt, use_chat_template):
    if isinstance(prompt, list) or (use_chat_template and getattr(tokenizer, "chat_template", None)):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def generate_transformers(hf_dir, texts, options):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.to(device).eval()
    torch.manual_seed(options.seed)
    tokenizer.padding_side = "left"  # generation continues every prompt of a batch from its last token
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for start in range(0, len(texts), options.batch_prompts):
        batch = tokenizer(texts[start:start + options.batch_prompts], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        with torch.no_grad():
            generated = model.generate(
                **batch, do_sample=True, temperature=options.temperature, top_p=options.top_p,
                max_new_tokens=options.max_new_tokens, num_return_sequences=options.num_samples, pad_token_id=pad_id,
            )
        texts_out = tokenizer.batch_decode(generated[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
        outputs += [texts_out[i:i + options.num_samples] for i in range(0, len(texts_out), options.num_samples)]
    return outputs


def generate_vllm(hf_dir, texts, options):
    from vllm import LLM, SamplingParams

    llm = LLM(model=hf_dir, seed=options.seed)
    params = SamplingParams(n=options.num_samples, temperature=options.temperature, top_p=options.top_p,
                            max_tokens=options.max_new_tokens, seed=options.seed)
    return [[o.text for o in result.outputs] for result in llm.generate(texts, params)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL")
    parser.add_argument("--num-samples", type=int, default=8, help="samples per prompt (n)")
    parser.add_argument("--k", type=int, default=None, help="pass@k (default: n)")
    parser.add_argument("--out", required=True, help="RESULT.json")
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--answer-key", default="answer")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto",
                        help="auto: vLLM when installed and a GPU is present, else transformers")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--strict-answers", action="store_true",
                        help="only `#### x` and \\boxed{x} count as answers (default: else the last number)")
    parser.add_argument("--batch-prompts", type=int, default=1,
                        help="transformers: prompts per generate call (left-padded; samples depend on it)")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if options.num_samples < 1 or options.batch_prompts < 1 or (options.k is not None and not 1 <= options.k <= options.num_samples):
        print(f"{PROG}: error: need --num-samples >= 1, 1 <= --k <= --num-samples and --batch-prompts >= 1", file=sys.stderr)
        return 2
    try:
        prompts, answers = read_prompts(options.prompts, options.prompt_key, options.answer_key, options.limit)
    except (OSError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(options.hf_dir)
    texts = [render(tokenizer, p, not options.no_chat_template) for p in prompts]
    backend = options.backend
    if backend == "auto":
        import importlib.util

        import torch

        backend = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "transformers"
    samples = (generate_vllm if backend == "vllm" else generate_transformers)(options.hf_dir, texts, options)
    metrics, per_prompt = evaluate(samples, answers, options.k or options.num_samples,
                                   last_number=not options.strict_answers)
    result = {**metrics, "backend": backend, "temperature": options.temperature, "top_p": options.top_p,
              "strict_answers": options.strict_answers,
              "prompts": [{"prompt": p, "reference": a, "samples": s, **scores}
                          for p, a, s, scores in zip(prompts, answers, samples, per_prompt)]}
    tmp = f"{options.out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, options.out)
    print(json.dumps({k: metrics[k] for k in ("self_bleu", "distinct_2", "pass_at_1", "pass_at_k", "k")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
