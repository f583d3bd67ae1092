"""Preprocessing in units (data/preprocess_run.py): Megatron's bytes, the same output for any number of
workers and unit size, and an interrupted run that resumes without redoing its finished units."""

import glob
import json
import os

import pytest

from sed_megatron.data import preprocess_run
from sed_megatron.data.sft_preprocess import PreprocessConfig, preprocess, read_indexed_sft
from sed_megatron.testing.tiny_hf import make_tokenizer

WORDS = "hello hi there you are a helper what is two plus three five".split()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tok"))
    make_tokenizer(directory, WORDS)
    return directory


def row(i):
    if i % 5 == 0:
        return {"messages": [{"role": "system", "content": "you are a helper"},
                             {"role": "user", "content": "what is two plus three"},
                             {"role": "assistant", "content": " ".join(["five"] * (i % 4 + 1))},
                             {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
    return {"prompt": "hello there", "response": " ".join(["hi"] * (i % 7 + 1))}


def make_shards(directory, bad_rows=()):
    """Two JSON-lines shards (30 and 17 rows) and a parquet shard (20 rows in row groups of 6):
    rows in bad_rows (global numbers) are malformed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    number = 0
    for name, count in (("a.jsonl", 30), ("b.jsonl", 17)):
        with open(os.path.join(directory, name), "w") as f:
            for _ in range(count):
                f.write("{oops\n" if number in bad_rows else json.dumps(row(number)) + "\n")
                number += 1
    rows = [{"prompt": "hello there", "response": " ".join(["hi"] * (i % 3 + 1))} for i in range(20)]  # one schema
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(directory, "c.parquet"), row_group_size=6)
    return str(directory)


def files(prefix):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(prefix + "*"))}


def run(source, tokenizer_dir, prefix, unit_rows=8, resume=True, **kwargs):
    notes = []
    summary = preprocess(PreprocessConfig(input=source, tokenizer=tokenizer_dir, output_prefix=str(prefix), **kwargs),
                         progress=False, log=notes.append, resume=resume, unit_rows=unit_rows)
    return summary, notes


def test_units_and_workers_give_megatrons_bytes(tmp_path, tokenizer_dir):
    """Units of 8 rows (a.jsonl: 4, b.jsonl: 3, c.parquet in row groups of 6: 2 units of 12 and 8 rows),
    on one process and on two, give the bytes of one unit per file, which are the bytes Megatron's
    IndexedDatasetBuilder writes for the same samples; a unit whose rows are all skipped adds nothing."""
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    source = make_shards(tmp_path / "in", bad_rows=set(range(8, 16)) | {40})  # a.jsonl's second unit: all bad
    one, notes = run(source, tokenizer_dir, tmp_path / "one" / "ds", skip_bad=True)
    assert one["units"] == 9 and notes == [] and sorted(os.listdir(tmp_path / "one")) == [
        "ds.bin", "ds.idx", "ds_loss_mask.bin", "ds_loss_mask.idx"]  # the work directory is gone
    assert one["samples"] == 67 - 9 and one["skipped"] == 9
    assert one["skipped_lines"][:3] == [f"{source}/a.jsonl:9", f"{source}/a.jsonl:10", f"{source}/a.jsonl:11"]
    assert one["reasons"]["malformed JSON"]["first_lines"][-1] == f"{source}/a.jsonl:13"
    two, _ = run(source, tokenizer_dir, tmp_path / "two" / "ds", skip_bad=True, workers=2)
    whole, _ = run(source, tokenizer_dir, tmp_path / "whole" / "ds", skip_bad=True, unit_rows=4096)
    reference = files(str(tmp_path / "one" / "ds"))
    assert files(str(tmp_path / "two" / "ds")) == reference and files(str(tmp_path / "whole" / "ds")) == reference
    drop = ("units", "units_reused")
    assert {k: v for k, v in two.items() if k not in drop} == {k: v for k, v in one.items() if k not in drop}
    assert {k: v for k, v in whole.items() if k not in drop} == {k: v for k, v in one.items() if k not in drop}
    assert whole["units"] == 3

    tokens, masks = read_indexed_sft(str(tmp_path / "one" / "ds"))
    built = str(tmp_path / "builder")
    tokens_out = IndexedDatasetBuilder(built + ".bin", dtype=numpy.uint16)
    mask_out = IndexedDatasetBuilder(built + "_loss_mask.bin", dtype=numpy.uint8)
    for i in range(len(tokens)):
        tokens_out.add_item(torch.tensor(tokens[i].tolist(), dtype=torch.int64))
        tokens_out.end_document()
        mask_out.add_item(torch.tensor(masks[i].tolist(), dtype=torch.uint8))
        mask_out.end_document()
    tokens_out.finalize(built + ".idx")
    mask_out.finalize(built + "_loss_mask.idx")
    assert {name.replace("builder", "ds"): data for name, data in files(built).items()} == reference
    lengths = sorted(int(n) for n in tokens.sequence_lengths)
    nearest_rank = lambda q: lengths[-int(-q * len(lengths) // 1) - 1]  # noqa: E731
    assert one["lengths"] == {"p50": nearest_rank(0.5), "p90": nearest_rank(0.9), "max": lengths[-1]}


RUN_UNIT = preprocess_run.run_unit


class Interrupt(BaseException):
    """Stands for a kill: raised by a unit, it leaves the work directory as a killed run does."""


def interrupted(monkeypatch, after):
    """run_unit counts its calls and raises Interrupt on call after + 1 (after=None: never)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[3])
        if after is not None and len(calls) > after:
            raise Interrupt
        return RUN_UNIT(*args, **kwargs)

    monkeypatch.setattr(preprocess_run, "run_unit", counting)
    return calls


def test_an_interrupted_run_resumes_its_finished_units(tmp_path, tokenizer_dir, monkeypatch):
    source = make_shards(tmp_path / "in")
    full, _ = run(source, tokenizer_dir, tmp_path / "ref" / "ds")
    reference = files(str(tmp_path / "ref" / "ds"))
    prefix = tmp_path / "out" / "ds"
    work = str(prefix) + ".parts"

    interrupted(monkeypatch, after=5)
    with pytest.raises(Interrupt):
        run(source, tokenizer_dir, prefix)
    assert os.listdir(tmp_path / "out") == ["ds.parts"]  # nothing at the prefix
    assert len(glob.glob(os.path.join(work, "*.json"))) == 5
    calls = interrupted(monkeypatch, after=None)
    summary, notes = run(source, tokenizer_dir, prefix)
    assert notes == [f"resuming from {work}: 5 of 9 unit(s) done (38 rows), 4 to go"]
    assert summary["units_reused"] == 5 and len(calls) == 4 and calls[0].number == 9  # b.jsonl's second unit on
    assert files(str(prefix)) == reference and not os.path.exists(work)
    assert {k: v for k, v in summary.items() if k != "units_reused"} == {k: v for k, v in full.items()
                                                                         if k != "units_reused"}

    # A changed shard: its units are redone, the others' are kept.
    interrupted(monkeypatch, after=7)
    with pytest.raises(Interrupt):
        run(source, tokenizer_dir, prefix)
    with open(os.path.join(source, "a.jsonl"), "a") as f:
        f.write(json.dumps(row(3)) + "\n")
    calls = interrupted(monkeypatch, after=None)
    summary, notes = run(source, tokenizer_dir, prefix)
    assert notes == [f"{work}: 4 finished unit(s) were made from another input or with other settings: redoing them",
                     f"resuming from {work}: 3 of 9 unit(s) done (17 rows), 6 to go"]
    assert summary["units_reused"] == 3 and len(calls) == 6 and summary["samples"] == 68

    # Other settings: every unit is redone; --no-resume: likewise.
    interrupted(monkeypatch, after=2)
    with pytest.raises(Interrupt):
        run(source, tokenizer_dir, prefix)
    calls = interrupted(monkeypatch, after=None)
    summary, notes = run(source, tokenizer_dir, prefix, seq_length=64)
    assert notes == [f"{work}: the input or the settings changed since the interrupted run: starting over "
                     "(2 finished unit(s) discarded)"]
    assert summary["units_reused"] == 0 and len(calls) == 9
    interrupted(monkeypatch, after=2)
    with pytest.raises(Interrupt):
        run(source, tokenizer_dir, prefix)
    interrupted(monkeypatch, after=None)
    summary, notes = run(source, tokenizer_dir, prefix, resume=False)
    assert notes == [f"{work}: --no-resume: starting over (2 finished unit(s) discarded)"]
    assert summary["units_reused"] == 0

    # Bad input in a resumed run: one line naming the row, and nothing left behind (nor the work directory).
    interrupted(monkeypatch, after=2)
    with pytest.raises(Interrupt):
        run(source, tokenizer_dir, prefix)
    interrupted(monkeypatch, after=None)
    with open(os.path.join(source, "b.jsonl"), "a") as f:
        f.write("{oops\n")
    with pytest.raises(ValueError, match=r"b\.jsonl:18: malformed JSON"):
        run(source, tokenizer_dir, prefix)
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx", "ds_loss_mask.bin", "ds_loss_mask.idx"]
