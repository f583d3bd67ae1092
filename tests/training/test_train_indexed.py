"""Training reads a preprocessed chat dataset (tokens + assistant-only loss masks)."""

import json

from sed_megatron.data.sft_preprocess import PreprocessConfig, preprocess
from sed_megatron.testing.tiny_hf import make_tokenizer

from .launch import train

NUMBERS = "zero one two three four five six seven eight nine".split()


def test_train_on_indexed_chat_data(tmp_path):
    make_tokenizer(str(tmp_path / "tok"), ["what", "is", "plus"] + NUMBERS)
    with open(tmp_path / "chats.jsonl", "w") as f:
        for a in range(10):
            for b in range(10):
                question = f"what is {NUMBERS[a]} plus {NUMBERS[b]}"
                f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": str(a + b)}]}) + "\n")
    prefix = str(tmp_path / "data" / "sums")
    summary = preprocess(PreprocessConfig(input=str(tmp_path / "chats.jsonl"), tokenizer=str(tmp_path / "tok"),
                                          output_prefix=prefix, seq_length=64), progress=False)
    assert summary["samples"] == 100
    flags = ["--sft-data-kind", "indexed", "--sft-data-path", prefix, "--sft-valid-fraction", "0.1",
             "--train-iters", "30", "--save", "", "--sed-calibrate-samples", "10", "--lr", "3e-3"]
    for run, extra in (("plain", []), ("packed", ["--sft-pack"])):
        records = train(str(tmp_path / run), 2, flags + extra)
        assert len(records) == 30
        # Only the answer digits and the end-of-turn token carry loss; the model learns them.
        first, last = records[0], records[-1]
        assert last["ce_loss"] < first["ce_loss"] - 1.0, (run, first["ce_loss"], last["ce_loss"])
