"""Diversity and accuracy metrics on hand-made cases with known values; the tool end to end."""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest

from sed_megatron.eval.metrics import answers_match, distinct_n, evaluate, extract_answer, pass_at_k, self_bleu

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_self_bleu_extremes():
    same = ["the cat sat on the mat today"] * 3
    assert self_bleu(same) == pytest.approx(1.0)
    disjoint = ["a b c d e f", "g h i j k l", "m n o p q r"]
    assert self_bleu(disjoint) < 0.01
    partial = ["the cat sat on the mat", "the cat sat on a rug", "dogs run in the park"]
    assert 0.01 < self_bleu(partial) < 1.0


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    assert distinct_n(["a"], 2) == 0.0


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 6), (10, 9, 2), (4, 4, 2)])
def test_pass_at_k_is_the_exact_probability(n, c, k):
    """The chance that a random k-subset of the n samples holds a correct one, by enumeration."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    exact = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


@pytest.mark.parametrize(
    "text,answer",
    [
        ("so she has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("Total: 1,234 dollars\n#### 1,234", "1,234"),
        ("The answer is $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}"),
        ("first \\boxed{1} then \\boxed{{2}+1}", "{2}+1"),
        ("I think it is 12, no wait, 15", "15"),
        ("no numbers here", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "predicted,reference,match",
    [("1,234", "1234", True), ("0.75", "\\frac{3}{4}", True), ("3/4", "0.75", True), ("$18", "18", True),
     ("18.0", "18", True), ("17", "18", False), ("x+1", "x + 1", False), ("Paris", "paris", True), (None, "1", False)],
)
def test_answers_match(predicted, reference, match):
    assert answers_match(predicted, reference) is match


def test_evaluate_aggregates_per_prompt():
    samples = [["#### 4", "#### 5", "#### 4"], ["so 9", "\\boxed{9}", "ten"]]
    metrics, per_prompt = evaluate(samples, ["2+2 makes 4\n#### 4", "#### 9"], k=2)
    assert [p["correct"] for p in per_prompt] == [2, 2]
    assert metrics["pass_at_1"] == pytest.approx(2 / 3)
    assert metrics["pass_at_k"] == pytest.approx(1.0)  # one wrong sample cannot fill a 2-subset
    assert metrics["num_samples"] == 3 and metrics["k"] == 2
    assert [p["answered"] for p in per_prompt] == [1.0, pytest.approx(2 / 3)]  # "ten" has no number
    strict_metrics, strict = evaluate(samples, ["2+2 makes 4\n#### 4", "#### 9"], k=2, last_number=False)
    assert [p["correct"] for p in strict] == [2, 1]  # "so 9" states no answer
    assert strict_metrics["answered"] == pytest.approx((1 + 1 / 3) / 2)


def test_tool_end_to_end(tmp_path, capsys):
    from sed_megatron.cli.eval_diversity import main
    from sed_megatron.testing.tiny_hf import make_tokenizer, tiny_hf_model

    hf_dir = str(tmp_path / "hf")
    tokenizer = make_tokenizer(hf_dir, ["what", "is", "plus"] + [str(i) for i in range(20)])
    model = tiny_hf_model("llama_gqa_untied", vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(hf_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"question": f"what is {a} plus {a}", "answer": f"#### {2 * a}"})
                                 for a in range(3)) + "\n")
    out = str(tmp_path / "result.json")
    assert main(["--hf-dir", hf_dir, "--prompts", str(prompts), "--prompt-key", "question", "--num-samples", "4",
                 "--max-new-tokens", "8", "--out", out, "--quiet"]) == 0
    with open(out) as f:
        result = json.load(f)
    for key in ("self_bleu", "distinct_1", "distinct_2", "distinct_3", "pass_at_1", "pass_at_k", "answered"):
        assert isinstance(result[key], float) and 0.0 <= result[key] <= 1.0 and math.isfinite(result[key])
    assert len(result["prompts"]) == 3 and all(len(p["samples"]) == 4 for p in result["prompts"])
    table = capsys.readouterr().out
    assert "| Self-BLEU (lower = more diverse) |" in table and "| pass@4 |" in table and "| distinct-3 |" in table
    with pytest.raises(SystemExit) as stop:  # bad input: one line, exit 2
        main(["--hf-dir", hf_dir, "--prompts", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x.json")])
    assert stop.value.code == 2 and not (tmp_path / "x.json").exists()
    assert capsys.readouterr().err.startswith("eval_diversity.py: error: ")


def test_batched_generation_equals_one_prompt_at_a_time(tmp_path):
    """Left padding: a prompt's continuation does not depend on the other prompts of its batch (greedy)."""
    from sed_megatron.eval.diversity import EvalConfig, evaluate_checkpoint
    from sed_megatron.testing.tiny_hf import make_tokenizer, tiny_hf_model

    hf_dir = str(tmp_path / "hf")
    tokenizer = make_tokenizer(hf_dir, ["what", "is", "plus", "times"] + [str(i) for i in range(20)])
    model = tiny_hf_model("llama_gqa_untied", vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = None  # every sample runs the full length
    model.save_pretrained(hf_dir)
    prompts = tmp_path / "prompts.jsonl"
    questions = ["what is 1", "what is 2 plus 3 times 4 plus 5", "what is 7 times 8", "3 plus 4 plus 5 plus 6 plus 7"]
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    samples = {}
    for batch in (1, 3):
        cfg = EvalConfig(hf_dir=hf_dir, prompts=str(prompts), prompt_key="question", num_samples=2, top_p=1e-9,
                         max_new_tokens=6, batch_prompts=batch, quiet=True)
        samples[batch] = [p["samples"] for p in evaluate_checkpoint(cfg)["prompts"]]
    assert samples[1] == samples[3]
    assert len({s[0] for s in samples[1]}) > 1 and all(len(s[0].split()) >= 3 for s in samples[1])


def test_no_transformers_progress_bar_off_a_terminal(tmp_path, capfd, monkeypatch):
    """transformers' "Loading weights" bar shows on a terminal only, as the project's own bars."""
    from transformers.utils import logging as hf_logging

    from sed_megatron.eval.generate import load_model
    from sed_megatron.testing.tiny_hf import make_tokenizer, tiny_hf_model

    hf_dir = str(tmp_path / "hf")
    tokenizer = make_tokenizer(hf_dir, ["what", "is"])
    tiny_hf_model("llama_gqa_untied", vocab_size=len(tokenizer)).save_pretrained(hf_dir)
    was_enabled = hf_logging.is_progress_bar_enabled()  # whatever earlier tests left behind
    hf_logging.enable_progress_bar()
    try:
        monkeypatch.setattr("sys.stderr.isatty", lambda: True)  # a terminal: the bar shows (what the check relies on)
        load_model(hf_dir, "cpu")
        assert "Loading weights" in capfd.readouterr().err
        monkeypatch.setattr("sys.stderr.isatty", lambda: False)
        load_model(hf_dir, "cpu")
        assert "Loading weights" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled()  # restored for whoever loads next
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def test_plot_metrics(tmp_path):
    for name, scale in (("ce", 1.0), ("sed", 1.1)):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for i in range(1, 6):
                f.write(json.dumps({"iteration": i, "loss": scale * 5 / i, "ce_loss": 5 / i, "mask_rate": 0.3 / i,
                                    "topk_mass": 0.1 * i}) + "\n")
    out = tmp_path / "curves.png"
    tool = os.path.join(REPO, "tools", "plot_metrics.py")
    run = subprocess.run([sys.executable, tool, str(tmp_path / "ce" / "metrics.jsonl"),
                          f"SED={tmp_path / 'sed' / 'metrics.jsonl'}", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    (tmp_path / "bad.jsonl").write_text('{"iteration": 1}\n{oops\n')
    run = subprocess.run([sys.executable, tool, str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "bad.jsonl:2: not JSON" in run.stderr and not (tmp_path / "x.png").exists()
