"""SFT data as users have it: parquet files, shard directories and saved datasets in each schema
(messages, ShareGPT, prompt/response, alpaca) give the same output files as JSON lines of
`messages`; bad rows are one line naming the file and row."""

import glob
import json
import os

import pytest

from sed_megatron.cli.preprocess_sft_data import main
from sed_megatron.data.sft_preprocess import PreprocessConfig, preprocess
from sed_megatron.testing.tiny_hf import make_tokenizer

WORDS = "what is two plus three five hello hi you are a helper think".split()
CHATS = [  # (system or None, [(user, assistant), ...])
    ("you are a helper", [("what is two plus three", "five"), ("hello", "hi")]),
    (None, [("hello", "hi you")]),
    ("you are a helper", [("what is two", "two")]),
]
SHAREGPT_NAMES = {"user": "human", "assistant": "gpt", "system": "system"}


def as_messages(system, turns):
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def as_sharegpt(system, turns):
    """The system prompt as ShareGPT's top-level field (LLaMA-Factory) or as a first turn."""
    conversations = [{"from": SHAREGPT_NAMES[m["role"]], "value": m["content"]}
                     for m in as_messages(None, turns)["messages"]]
    return {"conversations": conversations, **({"system": system} if system else {})}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tok"))
    make_tokenizer(directory, WORDS)
    return directory


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


CHAT_ROW = {"prompt": "hi", "response": "five"}


@pytest.fixture
def hub_cache(monkeypatch):
    """A dataset repository as huggingface_hub caches it (refs/main -> snapshots/<commit>/...)."""
    def make(root, name, files):
        repo = os.path.join(root, "datasets--" + name.replace("/", "--"))
        commit = "0" * 40
        os.makedirs(os.path.join(repo, "refs"))
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(commit)
        for relpath, rows in files.items():
            write_parquet(os.path.join(repo, "snapshots", commit, relpath), rows)
        monkeypatch.setenv("HF_HUB_CACHE", str(root))
        return str(root)
    return make


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def output(tmp_path, tokenizer_dir, source, name, **kwargs):
    prefix = str(tmp_path / name / "ds")
    summary = preprocess(PreprocessConfig(input=source, tokenizer=tokenizer_dir, output_prefix=prefix, **kwargs),
                         progress=False)
    return [open(p, "rb").read() for p in sorted(glob.glob(prefix + "*"))], summary


def test_every_source_and_schema_gives_the_jsonl_messages_output(tmp_path, tokenizer_dir):
    import datasets

    messages = [as_messages(*chat) for chat in CHATS]
    reference, _ = output(tmp_path, tokenizer_dir, write_jsonl(tmp_path / "ref.jsonl", messages), "ref")
    assert len(reference) == 4 and all(reference)
    sharegpt = [as_sharegpt(*chat) for chat in CHATS]
    sharegpt[2] = {"conversations": [{"from": "system", "value": CHATS[2][0]}, *sharegpt[2]["conversations"]]}
    shards = tmp_path / "shards"
    write_parquet(shards / "train-00000-of-00002.parquet", sharegpt[:2])
    write_parquet(shards / "train-00001-of-00002.parquet", sharegpt[2:])
    datasets.Dataset.from_list(messages).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(sharegpt),
                          "test": datasets.Dataset.from_list(sharegpt[:1])}).save_to_disk(str(tmp_path / "saved_dict"))
    sources = {
        "parquet_messages": (write_parquet(tmp_path / "m.parquet", messages), "messages"),
        "parquet_sharegpt": (write_parquet(tmp_path / "s.parquet", sharegpt), "sharegpt"),
        "shards": (str(shards), "sharegpt"),
        "saved": (str(tmp_path / "saved"), "messages"),
        "saved_dict_train": (str(tmp_path / "saved_dict"), "sharegpt"),
    }
    for name, (source, schema) in sources.items():
        files, summary = output(tmp_path, tokenizer_dir, source, name)
        assert files == reference, name
        assert summary["schemas"] == {schema: 3}, (name, summary["schemas"])
    # Two workers read the shards in the same order (rows travel to them as dicts).
    assert output(tmp_path, tokenizer_dir, str(shards), "workers", workers=2)[0] == reference


def test_single_turn_schemas_give_the_same_output(tmp_path, tokenizer_dir):
    single = [(system, turns) for system, turns in CHATS if len(turns) == 1]
    reference, _ = output(tmp_path, tokenizer_dir,
                          write_jsonl(tmp_path / "ref.jsonl", [as_messages(*chat) for chat in single]), "ref")
    # A table has every column in every row: a row without a system prompt holds None.
    prompt_response = [{"question": turns[0][0], "answer": turns[0][1], "sys": s} for s, turns in single]
    alpaca = [{"instruction": turns[0][0], "input": "", "output": turns[0][1], "system": s} for s, turns in single]
    files, summary = output(tmp_path, tokenizer_dir, write_parquet(tmp_path / "pr.parquet", prompt_response), "pr",
                            prompt_key="question", response_key="answer", system_key="sys")
    assert files == reference and summary["schemas"] == {"prompt_response": 2}
    files, summary = output(tmp_path, tokenizer_dir, write_parquet(tmp_path / "a.parquet", alpaca), "alpaca")
    assert files == reference and summary["schemas"] == {"alpaca": 2}
    # alpaca's input follows the instruction after a blank line
    with_input = [{"instruction": "what is", "input": "two plus three", "output": "five"}]
    joined = [{"messages": [{"role": "user", "content": "what is\n\ntwo plus three"},
                            {"role": "assistant", "content": "five"}]}]
    assert (output(tmp_path, tokenizer_dir, write_parquet(tmp_path / "ai.parquet", with_input), "ai")[0]
            == output(tmp_path, tokenizer_dir, write_jsonl(tmp_path / "ai.jsonl", joined), "aij")[0])


def test_the_cli_states_the_schema(tmp_path, tokenizer_dir, capsys):
    source = write_parquet(tmp_path / "s.parquet", [as_sharegpt(*chat) for chat in CHATS])
    assert main(["--input", source, "--tokenizer", tokenizer_dir, "--output-prefix", str(tmp_path / "o" / "ds"),
                 "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("preprocess_sft_data.py: read a parquet file, schema sharegpt "
                      "(detected per row; --schema to choose)")


@pytest.mark.parametrize("rows,kwargs,message", [
    ([{"prompt": "hello", "response": "hi"}, {"prompt": "hello"}], {}, "bad.parquet: row 2: field 'response' is null"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "wizard", "value": "five"}]}], {},
     "bad.parquet: row 1: message 1: unknown role 'wizard' (known: human, user, gpt,"),
    ([{"messages": [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "<think> five", "reasoning_content": None}]}], {},
     "bad.parquet: row 1: message 1: '<think>' without '</think>'"),
    ([{"question": "hi", "answer": "five"}], {}, "bad.parquet: row 1: no schema's fields (it has 'question', 'answer'"),
    ([{"prompt": "hi", "response": "five"}], {"schema": "sharegpt"},
     "bad.parquet: row 1: field 'conversations' must be a non-empty list of messages"),
])
def test_a_bad_row_names_the_file_and_row_and_leaves_nothing(tmp_path, tokenizer_dir, rows, kwargs, message):
    source = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError) as err:
        output(tmp_path, tokenizer_dir, source, "out", **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert os.listdir(tmp_path / "out") == []


def test_bad_inputs_are_one_line(tmp_path, tokenizer_dir, hub_cache):
    import datasets

    (tmp_path / "empty").mkdir()
    cache = hub_cache(tmp_path / "hub", "org/sft", {"data/train-00000-of-00001.parquet": [CHAT_ROW]})
    (tmp_path / "broken.parquet").write_text("not parquet")
    datasets.DatasetDict({"a": datasets.Dataset.from_list([{"prompt": "hi", "response": "five"}]),
                          "b": datasets.Dataset.from_list([{"prompt": "hi", "response": "five"}])}).save_to_disk(
        str(tmp_path / "two_splits"))
    for spec, message in (
            (str(tmp_path / "empty"), "a directory without .jsonl or .parquet files (nor a saved dataset)"),
            (str(tmp_path / "broken.parquet"), "broken.parquet: not a readable parquet file"),
            (str(tmp_path / "two_splits"), "two_splits: no split None; it has a, b (--input"),
            (str(tmp_path / "two_splits") + ":c", "no split 'c'; it has a, b"),
            ("hf:no-such/dataset-here", "--input hf:no-such/dataset-here: not in the local Hugging Face cache"),
            ("hf:org/sft:validation", "no .parquet / .jsonl files of split 'validation' in")):
        with pytest.raises(ValueError) as err:
            output(tmp_path, tokenizer_dir, spec, "out")
        assert message in str(err.value) and "\n" not in str(err.value), (spec, str(err.value))
    # The split named: it reads; a dataset in the hub cache reads without network.
    _, summary = output(tmp_path, tokenizer_dir, str(tmp_path / "two_splits") + ":b", "b")
    assert summary["samples"] == 1
    _, summary = output(tmp_path, tokenizer_dir, "hf:org/sft", "hub")
    assert summary["samples"] == 1 and summary["input"] == "1 file(s) of hf:org/sft from the Hugging Face cache"
    assert cache == os.environ["HF_HUB_CACHE"]
