"""examples/rl: the reward, the verl data and reward adapter, the export check, and 2 GRPO steps with TRL
on a tiny checkpoint that went HF -> Megatron -> HF through the project's converters."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from sed_megatron.eval.reward import math_reward, reference_answer

from ..convert.common import convert, export
from ..training.launch import REPO, _env

RL = os.path.join(REPO, "examples", "rl")


def _load(name):
    """An examples/rl module loaded by path, as verl loads its custom reward function."""
    spec = importlib.util.spec_from_file_location(f"rl_{name}", os.path.join(RL, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" if isinstance(r, dict) else r + "\n" for r in records)
    return str(path)


def test_math_reward_counts_only_a_stated_matching_answer():
    assert math_reward("She has 3 + 4 = 7 apples.\n#### 7", "7") == 1.0
    assert math_reward("so the total is \\boxed{1,800}.", "1800") == 1.0
    assert math_reward("\\boxed{\\frac{3}{4}}", "0.75") == 1.0
    assert math_reward("\\boxed{\\frac{3\\sqrt{2}-3}{2}}", "\\frac{3\\sqrt{2}-3}{2}") == 1.0  # as text
    assert math_reward("#### 8", "7") == 0.0
    assert math_reward("", "7") == 0.0
    # strict: an unstated last number earns nothing, unless asked for
    assert math_reward("so she has 7 apples", "7") == 0.0
    assert math_reward("so she has 7 apples", "7", strict=False) == 1.0
    # the answer after a closed think block counts, not the one inside it
    assert math_reward("<think>#### 7</think> so #### 8", "8") == 1.0
    assert math_reward("<think>#### 7</think> so #### 8", "7") == 0.0
    # a reference may be bare or a whole solution
    assert reference_answer("Ann has 2 + 5 = 7.\n#### 7") == "7"
    assert reference_answer("the area is $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert reference_answer(" 42 ") == "42" and reference_answer(None) is None
    assert math_reward("#### 7", "Ann has 2 + 5 = 7.\n#### 7") == 1.0


def test_verl_reward_adapter_as_verl_calls_it():
    module = _load("verl_reward")
    kwargs = dict(data_source="sed_megatron/gsm8k", ground_truth="18", extra_info={"split": "test", "index": 0})
    assert module.compute_score(solution_str="9 * 2 = 18\n#### 18", **kwargs) == {"score": 1.0, "acc": True}
    assert module.compute_score(solution_str="it is 18", **kwargs) == {"score": 0.0, "acc": False}
    assert module.compute_score(solution_str="it is 18", strict=False, **kwargs)["score"] == 1.0  # reward_kwargs
    # rows of the published parquet (data_source math_dapo, bare ground truth) score the same way
    assert module.compute_score("math_dapo", "so \\boxed{42409}", "42409")["score"] == 1.0


def test_prepare_data_writes_verl_rows(tmp_path):
    import pyarrow.parquet as pq

    prepare = _load("prepare_data")
    gsm8k = _write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Ann has 2 pens and buys 5. How many?", "answer": "2 + 5 = <<2+5=7>>7\n#### 7"},
        {"question": "A farm sells 1,000 eggs twice.", "answer": "1000 * 2 = 2000\n#### 2,000"},
    ])
    out = tmp_path / "gsm8k.parquet"
    assert prepare.main(["--format", "gsm8k", "--input", gsm8k, "--output", str(out), "--split", "test"]) == 0
    rows = pq.read_table(out).to_pylist()
    assert rows[1] == {
        "data_source": "sed_megatron/gsm8k",
        "prompt": [{"role": "user", "content": "A farm sells 1,000 eggs twice."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "2000"},
        "extra_info": {"split": "test", "index": 1, "reference": "1000 * 2 = 2000\n#### 2,000"},
    }
    math = _write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "solution": "We add: $\\boxed{\\frac{3}{4}}$."}])
    out = tmp_path / "math.parquet"
    assert prepare.main(["--format", "math", "--input", math, "--output", str(out), "--instruction",
                         "Put the final answer in \\boxed{}.", "--system", "Be brief."]) == 0
    (row,) = pq.read_table(out).to_pylist()
    assert row["reward_model"]["ground_truth"] == "\\frac{3}{4}" and row["data_source"] == "sed_megatron/math"
    assert row["prompt"] == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "What is $\\frac{1}{2} + \\frac{1}{4}$? "
                                                         "Put the final answer in \\boxed{}."}]


@pytest.mark.parametrize("bad_line,message", [
    ('{"question": "Q?", "answer": "no marker 7"}', "field 'answer' states no answer (`#### x` expected)"),
    ('{"question": "Q?"}', "missing field 'answer'"),
    ('{"question": "", "answer": "#### 1"}', "field 'question' must be a non-empty string"),
    ('{"question": "Q?", "answer": "#### 1"', "Expecting ','"),
    ('["question"]', "not a JSON object"),
])
def test_prepare_data_bad_input_names_file_and_line_and_writes_nothing(tmp_path, capsys, bad_line, message):
    prepare = _load("prepare_data")
    path = _write_jsonl(tmp_path / "in.jsonl", ['{"question": "Q?", "answer": "#### 1"}', "", bad_line])
    out = tmp_path / "out.parquet"
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--format", "gsm8k", "--input", path, "--output", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"prepare_data.py: error: {path}:3: ") and message in err
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no parquet, no temporary file


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random Llama with a word-level chat tokenizer, through convert_hf_to_mcore and
    convert_mcore_to_hf --hf-template: an exported checkpoint as users get one."""
    from transformers import GenerationConfig

    from sed_megatron.testing.tiny_hf import make_tokenizer, tiny_hf_model

    root = tmp_path_factory.mktemp("rl")
    template = str(root / "template")
    tokenizer = make_tokenizer(template, ["what", "is", "plus"])
    end_of_turn = tokenizer.convert_tokens_to_ids("<|end|>")
    model = tiny_hf_model("llama_gqa_tied", vocab_size=len(tokenizer))
    model.config.update({"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                         "bos_token_id": None})
    # As instruct models declare it: generation also ends at the chat template's end of turn.
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, end_of_turn],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(template)
    out = convert(template, str(root / "ckpt"))
    assert out.returncode == 0, out.stderr[-3000:]
    out = export(str(root / "ckpt"), str(root / "hf"), "--hf-template", template)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def _tensors(directory):
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "model.safetensors"))


def test_grpo_trl_two_steps_on_the_exported_checkpoint(exported, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = str(exported / "hf")
    # Single-digit sums: a random policy over a 21-token vocabulary ends on the right digit now
    # and then, so some groups of completions get unequal rewards and a non-zero GRPO gradient.
    problems = [{"question": f"what is {a} plus {b}", "answer": f"{a} plus {b} is {a + b}\n#### {a + b}"}
                for a, b in ((1, 2), (3, 4), (2, 5), (4, 1))]
    data = str(tmp_path / "train.parquet")
    assert _load("prepare_data").main(["--format", "gsm8k", "--input", _write_jsonl(tmp_path / "train.jsonl", problems),
                                       "--output", data, "--tokenizer", hf_dir]) == 0
    output_dir = str(tmp_path / "grpo")
    # --last-number-fallback: a random policy never writes `#### x`; the rule is tested above.
    cmd = [sys.executable, os.path.join(RL, "grpo_trl.py"), "--model", hf_dir, "--train-data", data,
           "--output-dir", output_dir, "--max-steps", "2", "--num-generations", "8", "--prompts-per-rollout", "2",
           "--prompts-per-update", "2", "--per-device-batch-size", "16", "--max-completion-length", "16",
           "--learning-rate", "1e-3", "--save-every-rollouts", "0", "--last-number-fallback"]
    out = subprocess.run(cmd, cwd=REPO, env={**_env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]

    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0.0 <= r["reward"] <= 1.0 and r["completions/mean_length"] > 0 for r in steps)
    assert any(r["reward_std"] > 0 and r["grad_norm"] > 0 for r in steps), steps  # a reward that varies, a gradient

    before, after = _tensors(hf_dir), _tensors(output_dir)
    assert before.keys() == after.keys()
    assert max(float((after[n] - before[n]).abs().max()) for n in before) > 1e-5  # the policy moved

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.config.model_type == "llama" and tokenizer.chat_template
    assert list(model.generation_config.eos_token_id) == [tokenizer.eos_token_id,
                                                          tokenizer.convert_tokens_to_ids("<|end|>")]
    check = _load("check_export")
    assert check.main([output_dir, "--for", "verl"]) == 0  # the TRL output is ready for verl / vLLM as well


def test_check_export_names_what_verl_would_miss(exported, tmp_path, capsys):
    check = _load("check_export")
    hf_dir = str(tmp_path / "hf")
    shutil.copytree(exported / "hf", hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    config["architectures"] = ["LlamaForCausalLM"]
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f)
    assert check.main([hf_dir]) == 0
    assert "assistant turns end with '<|end|>': a stop id" in capsys.readouterr().out

    del config["architectures"]
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f)
    assert check.main([hf_dir, "--for", "trl"]) == 0  # grpo_trl.py loads by model_type
    assert check.main([hf_dir, "--for", "verl"]) == 2
    assert "no `architectures`" in capsys.readouterr().err

    config["architectures"] = ["LlamaForCausalLM"]
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(hf_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 1, "pad_token_id": 0}, f)  # the end of turn forgotten
    assert check.main([hf_dir]) == 2
    assert "ends an assistant turn with '<|end|>' (7), which is not a stop id" in capsys.readouterr().err
