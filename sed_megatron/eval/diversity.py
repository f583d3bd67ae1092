"""Diversity and accuracy of a Hugging Face checkpoint: sample n responses per prompt, score them.

    result = evaluate_checkpoint(EvalConfig(hf_dir="hf/sed", prompts="gsm8k/test.jsonl", num_samples=8))

Prompts are JSON lines with a prompt field (text, or a `messages` list) and optionally a
reference answer (`#### 42`, `\\boxed{42}` or a bare value). Metric definitions: metrics.py.
"""

from dataclasses import dataclass

from sed_megatron.data.jsonl import read_jsonl

from .generate import BACKENDS, GENERATORS, render, resolve_backend
from .metrics import evaluate

SUMMARY_KEYS = ("self_bleu", "distinct_1", "distinct_2", "distinct_3", "pass_at_1", "pass_at_k", "answered")


@dataclass(frozen=True)
class EvalConfig:
    hf_dir: str
    prompts: str
    """JSONL file of prompts."""
    num_samples: int = 8
    """Samples per prompt (n)."""
    k: int | None = None
    """pass@k (default: n)."""
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    limit: int | None = None
    """The first N prompts only."""
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    backend: str = "auto"
    use_chat_template: bool = True
    strict_answers: bool = False
    """Only `#### x` and \\boxed{x} count as answers (else also the last number)."""
    batch_prompts: int = 1
    """transformers: prompts per generate call (left-padded; samples depend on it)."""
    quiet: bool = False

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.k is not None and not 1 <= self.k <= self.num_samples:
            raise ValueError(f"--k must lie in [1, --num-samples = {self.num_samples}], got {self.k}")
        if self.batch_prompts < 1:
            raise ValueError(f"--batch-prompts must be >= 1, got {self.batch_prompts}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


def read_prompts(path, prompt_key, answer_key, limit=None):
    """(prompts, reference answers or None): a prompt is its text or its `messages` list."""
    def parse(record):
        return record["messages"] if "messages" in record else record[prompt_key], record.get(answer_key)

    prompts, answers = zip(*read_jsonl(path, parse, limit))
    return list(prompts), list(answers)


def evaluate_checkpoint(cfg: EvalConfig):
    """The result: means of every metric, the settings, and per prompt its samples and scores."""
    import os

    from transformers import AutoTokenizer

    if not os.path.exists(os.path.join(cfg.hf_dir, "config.json")):
        raise ValueError(f"--hf-dir {cfg.hf_dir}: no config.json (a Hugging Face model directory)")
    prompts, answers = read_prompts(cfg.prompts, cfg.prompt_key, cfg.answer_key, cfg.limit)
    tokenizer = AutoTokenizer.from_pretrained(cfg.hf_dir)
    texts = [render(tokenizer, p, cfg.use_chat_template) for p in prompts]
    backend = resolve_backend(cfg.backend)
    samples = GENERATORS[backend](cfg.hf_dir, texts, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                                  batch_prompts=cfg.batch_prompts, quiet=cfg.quiet)
    metrics, per_prompt = evaluate(samples, answers, cfg.k or cfg.num_samples, last_number=not cfg.strict_answers)
    return {**metrics, "backend": backend, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "strict_answers": cfg.strict_answers,
            "prompts": [{"prompt": p, "reference": a, "samples": s, **scores}
                        for p, a, s, scores in zip(prompts, answers, samples, per_prompt)]}


def summary_table(result):
    """Every mean metric in one readable Markdown table."""
    k = result["k"]
    names = {"pass_at_k": f"pass@{k}", "pass_at_1": "pass@1", "self_bleu": "Self-BLEU (lower = more diverse)",
             "answered": "answered (share of samples that state an answer)"}
    rows = [f"| {names.get(key, key.replace('_', '-'))} | {result[key]:.4f} |" for key in SUMMARY_KEYS
            if result.get(key) is not None]
    head = f"{result['num_prompts']} prompts x {result['num_samples']} samples, {result['backend']}"
    return "\n".join([head, "| metric | value |", "|---|---:|", *rows])
