"""The rule-based math reward for RL after SFT (GRPO with verl or TRL: examples/rl/).

    from sed_megatron.eval.reward import math_reward, reference_answer
    math_reward("... so she has 7 apples.\\n#### 7", "7")            # 1.0
    math_reward("... the area is \\\\boxed{\\\\frac{3}{4}}", "0.75")     # 1.0
    math_reward("... 7 apples", "7")                                  # 0.0 (no stated answer)

One function, built on the answer extraction of `metrics.py` (the one eval_diversity.py
scores pass@k with), so that the RL reward and the before/after evaluation agree on what a
correct answer is: the last `#### x` or else the last `\\boxed{x}` of the completion,
compared with the reference as numbers (within 1e-6 relative; `3/4` = `0.75` =
`\\frac{3}{4}`), else as whitespace-normalized text.

Strict by default: only a stated answer counts. A reward that also accepted the last number
of a completion would pay a policy for ending on a lucky number; `strict=False` accepts it
(as eval_diversity.py does without --strict-answers).

Scale: 1.0 correct, 0.0 otherwise. The published RL reward pays +1 / -1 (SED-SFT's
verl/verl/utils/reward_score/math_dapo.py, compute_score, lines 295-332); GRPO normalizes
rewards within each prompt's group (mean and std), so the two scales give the same advantages.
"""

from .metrics import answers_match, extract_answer

THINK_END = "</think>"


def reference_answer(reference):
    """The answer a reference states: its last `#### x`, else its last `\\boxed{x}`, else the whole
    (stripped) text, which is then taken to be the answer itself (`42`, `\\frac{3}{4}`). None for None."""
    if reference is None:
        return None
    stated = extract_answer(str(reference), fallback_last_number=False)
    return stated if stated is not None else str(reference).strip()


def math_reward(completion, reference, strict=True):
    """1.0 when the completion's final answer equals the reference's, else 0.0.

    completion: the generated text (the response only, without the prompt). Reasoning models
    that close a `<think>` block are scored on what follows `</think>`, as the published reward.
    reference: a bare answer (`42`, `\\frac{3}{4}`) or a full solution (`... #### 42`, `... \\boxed{42}`).
    strict: only a stated `#### x` or `\\boxed{x}` counts; False also accepts the last number."""
    if THINK_END in completion:
        completion = completion.rsplit(THINK_END, 1)[1]
    predicted = extract_answer(completion, fallback_last_number=not strict)
    return 1.0 if answers_match(predicted, reference_answer(reference)) else 0.0
