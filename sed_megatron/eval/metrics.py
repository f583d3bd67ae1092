"""Diversity and accuracy of sampled responses: Self-BLEU, distinct-n, answer extraction, pass@k.

Definitions (for n samples of one prompt; every metric is then averaged over prompts):
  - Self-BLEU: the mean over samples i of BLEU-4 (nltk sentence_bleu, uniform weights,
    Chen & Cherry smoothing method 1) of sample i against the other n - 1 samples as
    references; whitespace tokens. Lower = more diverse. 0..1.
  - distinct-n: distinct n-grams / all n-grams over the n samples of the prompt. Higher = more diverse.
  - pass@k: the unbiased estimator 1 - C(n - c, k) / C(n, k) with c correct samples (Chen et al. 2021).
  - answers: GSM8K's `#### 42`, else the last `\\boxed{...}`, else (optionally) the last number;
    two answers match when both parse as numbers within 1e-6 relative, else as normalized text.
"""

import math
import re
from fractions import Fraction


def self_bleu(samples):
    """Self-BLEU of one prompt's samples (at least two)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if len(samples) < 2:
        raise ValueError("Self-BLEU needs at least two samples per prompt")
    tokens = [sample.split() for sample in samples]
    smoothing = SmoothingFunction().method1
    scores = []
    for i, hypothesis in enumerate(tokens):
        references = [t for j, t in enumerate(tokens) if j != i]
        if not hypothesis:
            scores.append(0.0)
            continue
        scores.append(sentence_bleu(references, hypothesis, smoothing_function=smoothing))
    return sum(scores) / len(scores)


def distinct_n(samples, n):
    """Distinct n-grams over all n-grams of the samples (0 when there are none)."""
    grams = [tuple(t[i : i + n]) for t in (s.split() for s in samples) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def pass_at_k(n, c, k):
    """Unbiased pass@k for n samples of which c are correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i = n - c + 1}^{n} (1 - k / i), stable for large n
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


_HASHES = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _last_boxed(text):
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return None


def extract_answer(text, fallback_last_number=True):
    """The final answer of a response, or None."""
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if fallback_last_number:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1]
    return None


def _as_number(text):
    text = text.strip().strip("$").replace(",", "").replace("\\!", "").replace(" ", "")
    text = re.sub(r"\\(?:d|t)?frac\{([^{}]+)\}\{([^{}]+)\}", r"(\1)/(\2)", text)
    text = text.rstrip(".").removesuffix("\\%").removesuffix("%")
    match = re.fullmatch(r"\(?(-?[\d.]+)\)?(?:/\(?(-?[\d.]+)\)?)?", text)
    if not match:
        return None
    try:
        value = Fraction(match.group(1))
        return value / Fraction(match.group(2)) if match.group(2) else value
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted, reference):
    if predicted is None or reference is None:
        return False
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1, abs(b))
    normalize = lambda s: re.sub(r"\s+", " ", s.strip().strip("$").rstrip(".")).lower()  # noqa: E731
    return normalize(predicted) == normalize(reference)


def evaluate(samples_per_prompt, references, k, last_number=True):
    """Aggregate metrics over prompts: samples_per_prompt[i] is a list of n strings.

    last_number=False: a sample counts only when it states its answer (`#### x` or `\\boxed{x}`)."""
    n = len(samples_per_prompt[0])
    if any(len(s) != n for s in samples_per_prompt):
        raise ValueError("every prompt needs the same number of samples")
    k = min(k, n)
    per_prompt = []
    for samples, reference in zip(samples_per_prompt, references, strict=True):
        reference_answer = extract_answer(reference) if reference is not None else None
        predicted = [extract_answer(s, last_number) for s in samples]
        correct = sum(answers_match(p, reference_answer) for p in predicted)
        per_prompt.append({
            "self_bleu": self_bleu(samples) if n > 1 else None,
            "distinct_1": distinct_n(samples, 1),
            "distinct_2": distinct_n(samples, 2),
            "distinct_3": distinct_n(samples, 3),
            "pass_at_1": correct / n,
            "pass_at_k": pass_at_k(n, correct, k),
            "answered": sum(p is not None for p in predicted) / n,  # share of samples with an answer
            "correct": correct,
        })
    mean = lambda key: sum(p[key] for p in per_prompt) / len(per_prompt) if per_prompt[0][key] is not None else None  # noqa: E731
    result = {key: mean(key) for key in ("self_bleu", "distinct_1", "distinct_2", "distinct_3", "pass_at_1", "pass_at_k",
                                            "answered")}
    result.update(k=k, num_samples=n, num_prompts=len(per_prompt))
    return result, per_prompt
