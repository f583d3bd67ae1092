"""verl's custom reward function: sed_megatron.eval.reward.math_reward behind verl's signature.

    python3 -m verl.trainer.main_ppo ... \\
        custom_reward_function.path=examples/rl/verl_reward.py custom_reward_function.name=compute_score
    # also accept the last number of a response (default: only a stated `#### x` / `\\boxed{x}`):
        +custom_reward_function.reward_kwargs.strict=false

verl loads this file by path (verl/utils/import_utils.py, load_module) in its reward workers and
calls compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...) once per
response, with solution_str the decoded response (special tokens skipped) and ground_truth the
row's reward_model.ground_truth (examples/rl/prepare_data.py). data_source is not consulted: the
rule is the same for GSM8K and MATH-style rows, and rows written by other tools (the published
math_train_data_filtered_qwen25_revised.parquet, data_source "math_dapo") are scored the same way.
"""

import os
import sys

# The reward workers import this file by path; make the repository importable from them even
# when sed_megatron is not installed in the RL environment.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from sed_megatron.eval.reward import math_reward  # noqa: E402


def compute_score(data_source, solution_str, ground_truth, extra_info=None, strict=True, **kwargs):
    """{"score": 1.0 | 0.0, "acc": bool}; verl trains on "score" and logs "acc" beside it."""
    score = math_reward(solution_str, ground_truth, strict=strict)
    return {"score": score, "acc": score == 1.0}
