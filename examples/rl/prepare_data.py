"""GSM8K or MATH-style JSON lines -> the parquet rows verl's RL trainer reads (TRL reads the same file).

    python examples/rl/prepare_data.py --format gsm8k --input gsm8k/train.jsonl --output data/rl/gsm8k_train.parquet
    python examples/rl/prepare_data.py --format math --input math/train.jsonl --output data/rl/math_train.parquet \\
        --tokenizer hf/qwen25-math-7b-sed

Input, one JSON object a line:
  --format gsm8k   {"question": ..., "answer": "... #### 42"}           (the answer must state `#### x`)
  --format math    {"problem": ..., "solution": "... \\boxed{42} ..."}   (the solution must hold a `\\boxed{x}`)
  (--prompt-key / --answer-key rename the fields.)

Output, one row per line (verl's RL dataset format, as its examples/data_preprocess/gsm8k.py writes it):
  data_source    "sed_megatron/gsm8k" or "sed_megatron/math": names no verl built-in scorer, so a run
                 that forgets `custom_reward_function` (examples/rl/verl_reward.py) stops instead of
                 silently scoring with another rule
  prompt         chat messages, [{"role": "user", "content": question}] (after an optional system
                 message): verl and TRL render them with the checkpoint's own chat template, the one
                 SFT trained on, so no template text is baked into the data
  ability        "math"
  reward_model   {"style": "rule", "ground_truth": the stated answer ("42", "\\frac{3}{4}")}
  extra_info     {"split", "index" (0-based sample number), "reference" (the full answer text)}

The question is used as SFT saw it (tools/preprocess_sft_data.py --prompt-key question puts
it in the user turn as is); --instruction appends a sentence, as verl's own examples do
("Let's think step by step and output the final answer after \\"####\\"."), for a model that
was not trained to state its answer in that form.

--tokenizer HF_DIR renders every prompt with that tokenizer's chat template and prints the
longest in tokens (set verl's data.max_prompt_length from it); it fails when the tokenizer has
no chat template. Bad input stops with one line naming the file and line, and leaves nothing
at --output.
"""

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sed_megatron.data.jsonl import read_jsonl  # noqa: E402
from sed_megatron.eval.metrics import extract_answer  # noqa: E402
from sed_megatron.utils import atomic_path, fail  # noqa: E402

PROG = "prepare_data.py"
# format -> (prompt key, answer key, how the answer is stated)
FORMATS = {"gsm8k": ("question", "answer", "`#### x`"), "math": ("problem", "solution", "`\\boxed{x}`")}


def _text(record, key):
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {key!r} must be a non-empty string")
    return value


def to_row(record, index, fmt, prompt_key, answer_key, split, instruction=None, system=None):
    """One verl RL row from one input record; ValueError when the record has no usable answer."""
    question, reference = _text(record, prompt_key), _text(record, answer_key)
    stated = "####" in reference if fmt == "gsm8k" else "\\boxed" in reference
    answer = extract_answer(reference, fallback_last_number=False) if stated else None
    if not answer:
        raise ValueError(f"field {answer_key!r} states no answer ({FORMATS[fmt][2]} expected)")
    if fmt == "gsm8k":
        answer = answer.replace(",", "")  # "1,800" -> "1800", as verl's GSM8K preprocessing
    content = f"{question.strip()} {instruction}" if instruction else question.strip()
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return {
        "data_source": f"sed_megatron/{fmt}",
        "prompt": prompt,
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": index, "reference": reference},
    }


def read_rows(path, fmt, prompt_key=None, answer_key=None, split="train", instruction=None, system=None, limit=None):
    """Rows of the JSONL file; ValueError("path:line: ...") on the first bad line."""
    prompt_key = prompt_key or FORMATS[fmt][0]
    answer_key = answer_key or FORMATS[fmt][1]
    position = itertools.count()

    def parse(record):
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return to_row(record, next(position), fmt, prompt_key, answer_key, split, instruction, system)

    return read_jsonl(path, parse, limit)


def write_parquet(rows, path):
    """All rows or nothing: the file appears at `path` only when completely written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def prompt_lengths(rows, tokenizer_dir):
    """Token count of every prompt rendered by the tokenizer's chat template (generation prompt included)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no chat template (verl and TRL render the prompt "
                         f"messages with it)")
    return [len(tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"]) for row in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL")
    parser.add_argument("--output", required=True, help="PARQUET")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--prompt-key", default=None, help="default: question (gsm8k), problem (math)")
    parser.add_argument("--answer-key", default=None, help="default: answer (gsm8k), solution (math)")
    parser.add_argument("--split", default="train", help="stored in extra_info")
    parser.add_argument("--instruction", default=None, help="appended to every question after a space")
    parser.add_argument("--system", default=None, help="a system message before every question")
    parser.add_argument("--limit", type=int, default=None, help="first N samples only")
    parser.add_argument("--tokenizer", default=None, help="HF directory: check its chat template, report prompt lengths")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rows = read_rows(options.input, options.format, options.prompt_key, options.answer_key, options.split,
                         options.instruction, options.system, options.limit)
        lengths = prompt_lengths(rows, options.tokenizer) if options.tokenizer else None
        write_parquet(rows, options.output)
    except (OSError, ValueError) as err:
        fail(str(err), PROG)
    longest = f", longest prompt {max(lengths)} tokens" if lengths else ""
    print(f"{options.output}: {len(rows)} rows ({rows[0]['data_source']}){longest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
