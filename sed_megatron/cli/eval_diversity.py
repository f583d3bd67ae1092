"""Sample several responses per prompt and measure diversity (Self-BLEU, distinct-n) and accuracy (pass@k).

    python tools/eval_diversity.py --hf-dir HF_DIR --prompts test.jsonl --num-samples 8 --out result.json
    python tools/eval_diversity.py --hf-dir HF_DIR --prompts gsm8k/test.jsonl --prompt-key question \\
        --answer-key answer --num-samples 16 --k 8 --max-new-tokens 512 --out gsm8k.json

Prompts: JSON lines with a prompt field (text, or a `messages` list) and optionally a reference
answer (`#### 42`, `\\boxed{42}` or a bare value). Generation: transformers on the CPU or one
GPU, or vLLM (--backend vllm, when installed). The prompt goes through the tokenizer's chat
template when it has one (--no-chat-template: raw text). RESULT.json holds the means
(self_bleu, distinct_1/2/3, pass_at_1, pass_at_k, answered) and, per prompt, the samples and
their scores; the means are printed as a table.
"""

import argparse
import json
import sys

from sed_megatron.eval.diversity import EvalConfig, evaluate_checkpoint, summary_table
from sed_megatron.eval.generate import BACKENDS
from sed_megatron.utils import atomic_write_text, fail, help_sections

PROG = "eval_diversity.py"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, **help_sections(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: vLLM when installed and a GPU is present, else transformers")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--strict-answers", action="store_true",
                        help="only `#### x` and \\boxed{x} count as answers (default: else the last number)")
    parser.add_argument("--batch-prompts", type=int, default=1,
                        help="transformers: prompts per generate call (left-padded; samples depend on it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None):
    options = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = EvalConfig(
            hf_dir=options.hf_dir, prompts=options.prompts, num_samples=options.num_samples, k=options.k,
            prompt_key=options.prompt_key, answer_key=options.answer_key, limit=options.limit,
            max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
            seed=options.seed, backend=options.backend, use_chat_template=not options.no_chat_template,
            strict_answers=options.strict_answers, batch_prompts=options.batch_prompts, quiet=options.quiet,
        )
        result = evaluate_checkpoint(cfg)
    except (OSError, ValueError) as err:
        fail(err, PROG)
    atomic_write_text(options.out, json.dumps(result, indent=1))
    print(summary_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
