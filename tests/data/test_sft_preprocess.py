"""Chat / prompt-response JSONL -> indexed dataset: masks, determinism, bad input, training reads it."""

import glob
import json
import os

import pytest

from sed_megatron.data.sft_preprocess import (
    IndexedSFTDataset,
    PreprocessConfig,
    preprocess,
    read_indexed_sft,
    split_indices,
)
from sed_megatron.testing.tiny_hf import make_tokenizer
from tests import warm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = "what is two plus three five hello hi you are a helper".split()
CHAT = {"messages": [
    {"role": "system", "content": "you are a helper"},
    {"role": "user", "content": "what is two plus three"},
    {"role": "assistant", "content": "five"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi"},
]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tok"))
    make_tokenizer(directory, WORDS)
    return directory


def write_jsonl(path, records):
    with open(path, "wb") as f:
        for record in records:
            f.write(record if isinstance(record, bytes) else json.dumps(record).encode())
            f.write(b"\n")
    return str(path)


def run(tmp_path, tokenizer_dir, records, **kwargs):
    os.makedirs(tmp_path, exist_ok=True)
    source = write_jsonl(tmp_path / "in.jsonl", records)
    prefix = str(tmp_path / "out" / "ds")
    cfg = PreprocessConfig(input=source, tokenizer=tokenizer_dir, output_prefix=prefix, **kwargs)
    return preprocess(cfg, progress=False), prefix


def decoded(prefix, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens, masks = read_indexed_sft(prefix)
    return [list(zip(tok.convert_ids_to_tokens(tokens[i].tolist()), masks[i].tolist())) for i in range(len(tokens))]


def targets(sample):
    return [token for token, m in sample if m]


def test_every_assistant_turn_and_only_those_carry_loss(tmp_path, tokenizer_dir):
    summary, prefix = run(tmp_path, tokenizer_dir, [CHAT])
    (sample,) = decoded(prefix, tokenizer_dir)
    assert targets(sample) == ["five", "<|end|>", "hi", "<|end|>"]
    assert [t for t, _ in sample][:4] == ["<|system|>", "you", "are", "a"]
    assert summary["samples"] == 1 and summary["loss_tokens"] == 4


def test_prompt_response_fields_with_and_without_template(tmp_path, tokenizer_dir):
    record = {"question": "what is two plus three", "answer": "five", "sys": "you are a helper"}
    _, prefix = run(tmp_path, tokenizer_dir, [record], prompt_key="question", response_key="answer", system_key="sys")
    (sample,) = decoded(prefix, tokenizer_dir)
    assert sample[0][0] == "<|system|>" and targets(sample) == ["five", "<|end|>"]
    _, prefix = run(tmp_path / "plain", tokenizer_dir, [record], prompt_key="question", response_key="answer",
                    use_chat_template=False)
    (sample,) = decoded(prefix, tokenizer_dir)
    assert targets(sample) == ["five", "<eos>"] and sample[0] == ("what", 0)


def test_output_is_the_same_for_any_number_of_workers(tmp_path, tokenizer_dir):
    records = [CHAT, {"prompt": "hello", "response": "hi five"}] * 40
    outputs = []
    for workers in (1, 2):
        _, prefix = run(tmp_path / f"w{workers}", tokenizer_dir, records, workers=workers)
        outputs.append([open(p, "rb").read() for p in sorted(glob.glob(prefix + "*"))])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 4


@pytest.mark.parametrize(
    "bad,kwargs,message",
    [
        (b'{"messages": [', {}, "in.jsonl:2: malformed JSON"),
        ({"prompt": "hello"}, {}, "in.jsonl:2: missing field 'response'"),
        ({"prompt": "hello", "response": "  "}, {}, "in.jsonl:2: empty response"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, {}, "in.jsonl:2: message 0: unknown role 'wizard'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, {},
         "in.jsonl:2: message 1: empty assistant response"),
        ({"prompt": "hello " * 40, "response": "hi"}, {"seq_length": 30}, "in.jsonl:2: sample of 45 tokens exceeds --seq-length + 1 = 31"),
        (b'{"prompt": "caf\xe9", "response": "hi"}', {}, "in.jsonl:2: not valid UTF-8"),
    ],
)
def test_bad_sample_names_file_and_line_and_leaves_nothing(tmp_path, tokenizer_dir, bad, kwargs, message):
    with pytest.raises(ValueError) as err:
        run(tmp_path, tokenizer_dir, [CHAT, bad], **kwargs)
    assert message in str(err.value)
    assert os.listdir(tmp_path / "out") == []


def test_tokenizer_without_chat_template(tmp_path):
    directory = str(tmp_path / "tok")
    make_tokenizer(directory, WORDS, chat_template=False)
    with pytest.raises(ValueError, match="no chat template"):
        run(tmp_path, directory, [CHAT])


def test_vocab_smaller_than_tokenizer(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="--vocab-size 5 is smaller than the tokenizer's"):
        run(tmp_path, tokenizer_dir, [CHAT], vocab_size=5)


def test_skip_bad_and_truncation_policies(tmp_path, tokenizer_dir):
    long = {"prompt": "hello", "response": "hi " * 40}
    summary, prefix = run(tmp_path / "skip", tokenizer_dir, [CHAT, b"{oops", long], skip_bad=True, seq_length=24)
    assert summary["samples"] == 1 and summary["skipped"] == 2 and summary["skipped_lines"] == [2, 3]
    summary, prefix = run(tmp_path / "trunc", tokenizer_dir, [CHAT, long], truncation="truncate", seq_length=24)
    assert summary["samples"] == 2 and len(read_indexed_sft(prefix)[0][1]) == 25
    summary, _ = run(tmp_path / "skiplong", tokenizer_dir, [CHAT, long], truncation="skip", seq_length=24)
    assert summary["samples"] == 1 and summary["skipped"] == 1


def test_skip_summary_counts_per_reason(tmp_path, tokenizer_dir):
    """The report: one entry per reason with its count, the length range and the first lines."""
    from sed_megatron.data.sft_preprocess import skip_report

    records = [CHAT] + [{"prompt": "hello", "response": "hi " * n} for n in (30, 41, 35, 38, 50, 33)] + [b"{oops", CHAT]
    summary, _ = run(tmp_path, tokenizer_dir, records, skip_bad=True, seq_length=24)
    assert summary["samples"] == 2 and summary["skipped"] == 7
    too_long = summary["reasons"]["longer than --seq-length + 1 = 25 tokens"]
    assert too_long["count"] == 6 and too_long["first_lines"] == [2, 3, 4, 5, 6]
    assert too_long["min_length"] < too_long["max_length"] and too_long["min_length"] > 25
    assert summary["reasons"]["malformed JSON"] == {"count": 1, "first_lines": [8], "min_length": None,
                                                    "max_length": None}
    lengths = summary["lengths"]
    assert lengths["p50"] == lengths["p90"] == lengths["max"] > 0  # the two kept samples are the same chat
    report = skip_report(summary)
    assert len(report) == 2
    assert report[0] == (f"skipped 6 sample(s): longer than --seq-length + 1 = 25 tokens, {too_long['min_length']}-"
                         f"{too_long['max_length']} tokens (lines 2, 3, 4, 5, 6, ...)")
    assert report[1] == "skipped 1 sample(s): malformed JSON (lines 8)"


def test_cli_contract(tmp_path, tokenizer_dir):
    tool = os.path.join(REPO, "tools", "preprocess_sft_data.py")
    good = write_jsonl(tmp_path / "good.jsonl", [CHAT])
    out = warm.capture(tool, ["--input", good, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "a" / "ds",
                              "--seq-length", "64", "--no-progress"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "a")) == ["ds.bin", "ds.idx", "ds_loss_mask.bin", "ds_loss_mask.idx"]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    n = summary["lengths"]["max"]
    assert out.stderr.strip().splitlines()[-1] == (
        f"preprocess_sft_data.py: 1 samples, {n} tokens ({summary['loss_tokens']} with loss); sample length p50 {n}, "
        f"p90 {n}, max {n} tokens; dropped 0")
    bad = write_jsonl(tmp_path / "bad.jsonl", [CHAT, {"prompt": "x"}])
    out = warm.capture(tool, ["--input", bad, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "b" / "ds",
                              "--no-progress"])
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == f"preprocess_sft_data.py: error: {bad}:2: missing field 'response'"
    assert not os.path.exists(tmp_path / "b") or os.listdir(tmp_path / "b") == []


def test_indexed_dataset_splits_and_epochs(tmp_path, tokenizer_dir):
    records = [{"prompt": "hello", "response": " ".join(["hi"] * (i % 5 + 1))} for i in range(20)]
    _, prefix = run(tmp_path, tokenizer_dir, records)
    train_idx, valid_idx = split_indices(20, 0.1, seed=3)
    assert len(valid_idx) == 2 and sorted(train_idx + valid_idx) == list(range(20))
    data = IndexedSFTDataset(prefix, train_idx, length=54, seq_length=16, seed=3)
    first_epoch = [data[i]["tokens"].tolist() for i in range(18)]
    second_epoch = [data[i]["tokens"].tolist() for i in range(18, 36)]
    assert sorted(map(tuple, first_epoch)) == sorted(map(tuple, second_epoch))  # each sample once per epoch
    assert first_epoch != second_epoch  # reshuffled
    again = IndexedSFTDataset(prefix, train_idx, length=54, seq_length=16, seed=3)
    assert [again[i]["tokens"].tolist() for i in range(18)] == first_epoch
    with pytest.raises(ValueError, match="do not fit --seq-length"):
        IndexedSFTDataset(prefix, train_idx, length=4, seq_length=4, seed=3)


def test_default_keeps_samples_up_to_the_papers_32000_tokens(tmp_path, tokenizer_dir):
    """Without --seq-length a sample of 32,000 tokens is kept (the published MAX_SEQ_LENGTH), one
    of 32,001 is not; the summary reports the lengths and the drop."""
    template = run(tmp_path / "probe", tokenizer_dir, [{"prompt": "hello", "response": "hi"}])[0]["tokens"] - 1
    fits = {"prompt": "hello", "response": "hi " * (32000 - template)}
    over = {"prompt": "hello", "response": "hi " * (32001 - template)}
    summary, _ = run(tmp_path / "paper", tokenizer_dir, [fits, over, fits], truncation="skip")
    assert summary["samples"] == 2 and summary["skipped"] == 1 and summary["skipped_lines"] == [2]
    assert summary["lengths"] == {"p50": 32000, "p90": 32000, "max": 32000}
    assert list(summary["reasons"]) == ["longer than --seq-length + 1 = 32000 tokens"]
