"""Where SFT samples come from: JSON lines, parquet files, a directory of shards, a dataset saved
with `datasets` (`save_to_disk`), or one in the local Hugging Face cache (`hf:NAME[:SPLIT]`).

    source = open_source("data/train-*.parquet dir, file or hf:NAME")
    source.total                              # rows (for the progress bar)
    for item in source.items(): ...           # Item(path, number, payload), in a fixed order
    units = source.units(4096)                # the same rows in spans of about 4096 (Unit, picklable)
    for item in source.items(units[3]): ...   # one span, read on its own (in a worker process)

A payload is a JSON line's bytes (parsed where it is tokenized: in the worker) or a row's dict.
`where(item)` names it in messages: `file.jsonl:12` (a line) or `file.parquet: row 12`. Rows are
read a batch at a time: memory stays flat in the dataset's size. A unit is a span of rows that
can be read without the rows before it (a byte offset into a JSON-lines file, row groups of a
parquet file, an index range of a saved dataset): the unit of work and of resumption of
data/preprocess_run.py. Reading a saved or cached
dataset needs the `datasets` package; parquet files need pyarrow only; hf:NAME reads the
dataset repository's files from the Hugging Face hub cache (huggingface_hub, no network).
"""

import glob
import os
from dataclasses import dataclass
from typing import Any

SHARD_SUFFIXES = (".jsonl", ".parquet")
HF_PREFIX = "hf:"
BATCH_ROWS = 1024


@dataclass(frozen=True)
class Unit:
    """A span of rows of one part of a source, readable on its own."""

    part: int
    """Index into Source.parts."""
    number: int
    """1-based row (line) number of its first row in the part."""
    rows: int
    start: int
    """Where reading starts: a byte offset (JSON lines), a row group (parquet), a row index (dataset)."""
    stop: int
    """Where it ends (exclusive): a row group (parquet), else start + rows or the end offset."""


@dataclass(frozen=True)
class Item:
    path: str
    number: int
    """1-based: the line of a JSON-lines file, the row of a table."""
    payload: Any
    """bytes (a JSON line) or a dict (a row)."""


def where(item):
    if isinstance(item.payload, (bytes, bytearray)):
        return f"{item.path}:{item.number}"
    return f"{item.path}: row {item.number}"


class _JsonLines:
    def __init__(self, path):
        self.path = path

    def identity(self):
        return _file_identity(self.path)

    def count(self):
        with open(self.path, "rb") as f:
            return sum(1 for _ in f)

    def spans(self, rows):
        """(number, rows, start offset, end offset) of every `rows` lines: one pass over the file."""
        spans, number, offset, first, count = [], 1, 0, 0, 0
        with open(self.path, "rb") as f:
            for raw in f:
                offset += len(raw)
                count += 1
                if count == rows:
                    spans.append((number, count, first, offset))
                    number, first, count = number + count, offset, 0
        if count:
            spans.append((number, count, first, offset))
        return spans

    def items(self, unit=None):
        with open(self.path, "rb") as f:
            if unit is None:
                lines, number = f, 1
            else:
                f.seek(unit.start)
                lines, number = (f.readline() for _ in range(unit.rows)), unit.number
            for number, raw in enumerate(lines, number):
                yield Item(self.path, number, raw.rstrip(b"\r\n"))


class _Parquet:
    def __init__(self, path):
        self.path = path

    def _file(self):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path)
        except Exception as err:  # pyarrow's ArrowInvalid and OSError: one line naming the file
            raise ValueError(f"{self.path}: not a readable parquet file ({err})") from None

    def identity(self):
        return _file_identity(self.path)

    def count(self):
        return self._file().metadata.num_rows

    def spans(self, rows):
        """Whole row groups, as many as make at least `rows` rows (one group may hold more)."""
        metadata = self._file().metadata
        spans, number, first, count = [], 1, 0, 0
        for group in range(metadata.num_row_groups):
            count += metadata.row_group(group).num_rows
            if count >= rows or group == metadata.num_row_groups - 1:
                if count:
                    spans.append((number, count, first, group + 1))
                number, first, count = number + count, group + 1, 0
        return spans

    def items(self, unit=None):
        parquet = self._file()
        groups = None if unit is None else list(range(unit.start, unit.stop))
        number = 0 if unit is None else unit.number - 1
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=groups):
            for row in batch.to_pylist():
                number += 1
                yield Item(self.path, number, row)


class _Dataset:
    """A `datasets` Dataset, named `name` in messages."""

    def __init__(self, name, dataset):
        self.path, self.dataset = name, dataset

    def identity(self):
        return f"{self.path}:{getattr(self.dataset, '_fingerprint', '')}"

    def count(self):
        return len(self.dataset)

    def spans(self, rows):
        return [(start + 1, min(rows, len(self.dataset) - start), start, min(start + rows, len(self.dataset)))
                for start in range(0, len(self.dataset), rows)]

    def items(self, unit=None):
        start, stop = (0, len(self.dataset)) if unit is None else (unit.start, unit.stop)
        for first in range(start, stop, BATCH_ROWS):
            batch = self.dataset[first:min(first + BATCH_ROWS, stop)]
            columns = list(batch)
            for number, values in enumerate(zip(*(batch[c] for c in columns)), first + 1):
                yield Item(self.path, number, dict(zip(columns, values)))


class Source:
    def __init__(self, spec, parts, kind):
        self.spec, self.parts, self.kind = spec, parts, kind
        self._total = None

    @property
    def total(self):
        """Rows in all parts (a JSON-lines file is read through once to count its lines)."""
        if self._total is None:
            self._total = sum(part.count() for part in self.parts)
        return self._total

    def units(self, rows):
        """The rows in spans of about `rows` (never across parts), in reading order."""
        units = [Unit(index, *span) for index, part in enumerate(self.parts) for span in part.spans(rows)]
        self._total = sum(unit.rows for unit in units)
        return units

    def identity(self, unit):
        """What a unit's rows depend on: the part's file (path, size, modification time) or the
        saved dataset's fingerprint, and the span."""
        return f"{self.parts[unit.part].identity()}|{unit.number}+{unit.rows}@{unit.start}:{unit.stop}"

    def items(self, unit=None):
        """Every row in order, or one unit's."""
        if unit is not None:
            yield from self.parts[unit.part].items(unit)
            return
        for part in self.parts:
            yield from part.items()


def _file_identity(path):
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def _datasets(spec, what):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--input {spec}: reading {what} needs the `datasets` package "
                         f"(pip install -e '.[data]')") from None
    return datasets


def _one_split(spec, loaded, split):
    """The split of a DatasetDict (or the Dataset itself)."""
    if not hasattr(loaded, "keys"):
        return loaded
    splits = sorted(loaded.keys())
    if split is None:
        if splits == ["train"] or len(splits) == 1:
            split = splits[0]
        elif "train" in splits:
            split = "train"
    if split not in splits:
        raise ValueError(f"--input {spec}: no split {split!r}; it has {', '.join(splits)} (--input {spec}:SPLIT)")
    return loaded[split]


def _saved_dataset(spec, directory, split):
    datasets = _datasets(spec, "a dataset saved with save_to_disk")
    try:
        loaded = datasets.load_from_disk(directory)
    except Exception as err:  # datasets raises FileNotFoundError and its own errors
        raise ValueError(f"--input {spec}: cannot load the saved dataset ({type(err).__name__}: {err})") from None
    return _Dataset(directory, _one_split(spec, loaded, split))


def _cached_hub_dataset(spec):
    """hf:NAME[:SPLIT]: the split's .parquet / .jsonl files in the dataset repository's snapshot in
    the local Hugging Face cache (HF_HUB_CACHE, else the default), read as shards; no network."""
    from huggingface_hub import snapshot_download

    name, _, split = spec[len(HF_PREFIX):].partition(":")
    split = split or "train"
    try:
        snapshot = snapshot_download(name, repo_type="dataset", local_files_only=True,
                                     cache_dir=os.environ.get("HF_HUB_CACHE"))
    except Exception as err:  # huggingface_hub's LocalEntryNotFoundError and friends
        raise ValueError(f"--input {spec}: not in the local Hugging Face cache (no network is used: "
                         f"{type(err).__name__})") from None
    files = _shards(snapshot)
    chosen = [path for path in files if _in_split(os.path.relpath(path, snapshot), split)]
    if not chosen:
        found = [os.path.relpath(path, snapshot) for path in files[:4]]
        raise ValueError(f"--input {spec}: no .parquet / .jsonl files of split {split!r} in {snapshot} (it has "
                         f"{', '.join(found) or 'none'}{', ...' if len(files) > 4 else ''}; hf:{name}:SPLIT)")
    return [_file_part(path) for path in chosen]


def _in_split(relpath, split):
    """Hugging Face's file naming: data/train-00000-of-00002.parquet, train/0000.parquet, train.jsonl."""
    parts = relpath.split(os.sep)
    stem = os.path.basename(relpath).split(".")[0]
    return split in parts[:-1] or stem == split or stem.startswith(f"{split}-")


def _shards(directory):
    return sorted(path for path in glob.glob(os.path.join(directory, "**", "*"), recursive=True)
                  if path.endswith(SHARD_SUFFIXES) and os.path.isfile(path))


def _is_saved_dataset(directory):
    return any(os.path.exists(os.path.join(directory, name))
               for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _file_part(path):
    if path.endswith(".parquet"):
        return _Parquet(path)
    return _JsonLines(path)


def open_source(spec):
    """The Source of --input: a file (.parquet, else JSON lines), a directory of shards (its
    .jsonl and .parquet files, in name order, subdirectories included), a saved dataset
    (DIR, or DIR:SPLIT for a DatasetDict), or hf:NAME[:SPLIT]. ValueError (one line) otherwise."""
    if spec.startswith(HF_PREFIX):
        parts = _cached_hub_dataset(spec)
        return Source(spec, parts, f"{len(parts)} file(s) of {spec} from the Hugging Face cache")
    directory, split = spec, None
    if not os.path.exists(spec) and ":" in spec:
        directory, _, split = spec.rpartition(":")
    if os.path.isdir(directory) and _is_saved_dataset(directory):
        return Source(spec, [_saved_dataset(spec, directory, split)], "a dataset saved with save_to_disk")
    if os.path.isdir(spec):
        shards = _shards(spec)
        if not shards:
            raise ValueError(f"--input {spec}: a directory without .jsonl or .parquet files (nor a saved dataset)")
        return Source(spec, [_file_part(path) for path in shards], f"{len(shards)} shard(s)")
    if not os.path.isfile(spec):
        raise ValueError(f"{spec}: no such input file")
    return Source(spec, [_file_part(spec)], "a parquet file" if spec.endswith(".parquet") else "JSON lines")

