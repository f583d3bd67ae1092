"""The preprocessing driver: SFT data -> one indexed dataset, in resumable units, on worker processes.

    summary = preprocess(cfg, log=print)      # cfg: sft_preprocess.PreprocessConfig; also sft_preprocess.preprocess

The source's rows are split in units (sources.Unit: a span of about `unit_rows` rows of one file,
never across files). Each unit is tokenized by one process (the caller's with --workers 1, one of
a spawn pool otherwise) into its own pair of indexed datasets in a work directory beside the
prefix, PREFIX.parts/ (NNNNNN.bin/.idx, NNNNNN_loss_mask.bin/.idx), and then a done marker
NNNNNN.json is written atomically: its key (a hash of the settings, the tokenizer's files, the
code of sed_megatron/data and the unit's input: file path, size and modification time, or a saved
dataset's fingerprint, and its row span) and its summary. Workers send back only that summary.

At the end the units are concatenated in order into PREFIX.bin/.idx and PREFIX_loss_mask.bin/.idx
(written inside the work directory, renamed into place) and the work directory is removed. The
output is byte for byte what Megatron's IndexedDatasetBuilder writes for the samples in input
order, whatever the number of workers and however often the run was interrupted.

A killed run (kill -9, Ctrl-C, a lost node) leaves PREFIX.parts/ and nothing at the prefix; the
same command again reuses every unit whose done marker carries the key it would write, and
redoes the rest (a changed input file or setting changes the key: those units start over, and
the log says so). Bad input (a bad row without --skip-bad, no usable sample) removes the work
directory: nothing is left behind. Memory stays flat in the dataset's size: a unit holds its
rows' lengths only, the summary keeps a histogram of sample lengths and the first skipped rows.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import sys

import numpy

from .schemas import SampleError
from .sources import open_source, where

UNIT_ROWS = 1024
"""Rows per unit: the work a kill loses at most (per worker), and the grain of load balance."""
WORK_SUFFIX = ".parts"
FIRST_SKIPPED = 20
"""Skipped rows listed in the summary."""
FIRST_LINES = 5
"""Line numbers kept per skip reason."""
FORMAT = 1
"""Bumped when a unit's files change meaning: finished units of an older format are redone."""

# Megatron's indexed dataset (megatron/core/datasets/indexed_dataset.py, _IndexWriter), written
# here with numpy alone so that workers need not import megatron.core (and torch): the same bytes.
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {numpy.uint8: 1, numpy.int32: 4, numpy.uint16: 8}


def token_dtype(vocab_size):
    """Megatron's DType.optimal_dtype: uint16 below 65,500 ids, else int32."""
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


def output_paths(prefix):
    """The four files of a dataset at prefix."""
    return [prefix + ".bin", prefix + ".idx", prefix + "_loss_mask.bin", prefix + "_loss_mask.idx"]


class _DocumentWriter:
    """One indexed dataset (.bin + .idx) of one-sequence documents, as IndexedDatasetBuilder writes it."""

    def __init__(self, prefix, dtype):
        self.prefix, self.dtype = prefix, dtype
        self.data = open(prefix + ".bin", "wb")
        self.lengths = []

    def add(self, values):
        array = numpy.asarray(values, dtype=self.dtype)
        self.data.write(array.tobytes())
        self.lengths.append(len(array))

    def finalize(self):
        self.data.close()
        lengths = numpy.asarray(self.lengths, dtype=numpy.int32)
        _write_index(self.prefix + ".idx", self.dtype, len(lengths), lambda: [lengths])


def _write_index(path, dtype, count, length_chunks):
    """Megatron's .idx of `count` documents of one sequence each. length_chunks(): the sequence
    lengths as int32 arrays, in order; called three times (lengths, byte offsets, document
    boundaries), so that a merge holds one unit's lengths at a time."""
    itemsize = numpy.dtype(dtype).itemsize
    with open(path, "wb") as f:
        f.write(_INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", count) + struct.pack("<Q", count + 1))
        for lengths in length_chunks():
            f.write(lengths.astype(numpy.int32).tobytes())
        offset = 0
        for lengths in length_chunks():
            ends = offset + numpy.cumsum(lengths.astype(numpy.int64) * itemsize)
            f.write(numpy.concatenate(([offset], ends[:-1])).astype(numpy.int64)[: len(lengths)].tobytes())
            offset = int(ends[-1]) if len(lengths) else offset
        step = 1 << 20
        for first in range(0, count + 1, step):  # document i ends at sequence i: 0, 1, ..., count
            f.write(numpy.arange(first, min(first + step, count + 1), dtype=numpy.int64).tobytes())


_INDEX_PREAMBLE = len(_INDEX_HEADER) + 8 + 1
"""Bytes before the sequence count in an .idx: header, version, dtype code."""


def _sequence_count(idx_path):
    with open(idx_path, "rb") as f:
        f.seek(_INDEX_PREAMBLE)
        return struct.unpack("<Q", f.read(8))[0]


def _sequence_lengths(idx_path):
    return numpy.fromfile(idx_path, dtype=numpy.int32, count=_sequence_count(idx_path), offset=_INDEX_PREAMBLE + 16)


def merge(unit_prefixes, prefix, dtype):
    """Concatenate indexed datasets of one-sequence documents, in order, into one at prefix:
    the bytes IndexedDatasetBuilder.add_index of each would give, one unit in memory at a time."""
    with open(prefix + ".bin", "wb") as out:
        for unit_prefix in unit_prefixes:
            with open(unit_prefix + ".bin", "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    count = sum(_sequence_count(p + ".idx") for p in unit_prefixes)
    _write_index(prefix + ".idx", dtype, count, lambda: (_sequence_lengths(p + ".idx") for p in unit_prefixes))


# -- settings and keys ------------------------------------------------------------------------------------------


def settings_digest(cfg, unit_rows):
    """Everything but the input that a unit's bytes depend on."""
    digest = hashlib.sha256(f"format {FORMAT}, unit rows {unit_rows}\n".encode())
    settings = dataclasses.asdict(cfg)
    for volatile in ("input", "output_prefix", "workers", "tokenizer"):
        settings.pop(volatile, None)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    if os.path.isdir(cfg.tokenizer):
        for name in sorted(os.listdir(cfg.tokenizer)):
            path = os.path.join(cfg.tokenizer, name)
            if os.path.isfile(path) and not name.endswith((".safetensors", ".bin", ".gguf", ".pt", ".pth")):
                with open(path, "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read())
    else:  # a hub id: its cached files are not ours to walk; the name stands for them
        digest.update(cfg.tokenizer.encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(here)):  # the code that turns rows into tokens: an edit redoes the units
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


def unit_key(settings, source, unit):
    return hashlib.sha256(f"{settings}|{source.identity(unit)}".encode()).hexdigest()[:24]


# -- one unit -----------------------------------------------------------------------------------------------------


def _new_summary():
    return {"samples": 0, "tokens": 0, "loss_tokens": 0, "skipped": 0, "skipped_lines": [], "reasons": {},
            "schemas": {}, "lengths": {}}


def _count_skip(reasons, reason, line_no, length, count=1, first_lines=None, min_length=None, max_length=None):
    entry = reasons.setdefault(reason, {"count": 0, "first_lines": [], "min_length": None, "max_length": None})
    entry["count"] += count
    for at in first_lines if first_lines is not None else [line_no]:
        if len(entry["first_lines"]) < FIRST_LINES:
            entry["first_lines"].append(at)
    for bound in (length, min_length, max_length):
        if bound is not None:
            entry["min_length"] = bound if entry["min_length"] is None else min(entry["min_length"], bound)
            entry["max_length"] = bound if entry["max_length"] is None else max(entry["max_length"], bound)


class _UnitError(Exception):
    """A row no policy skips: its message names the file and row."""


def run_unit(tokenizer, cfg, source, unit, unit_prefix, dtype, one_file, tick=None):
    """Tokenize one unit into unit_prefix's four files; its summary (lengths: {length: count}).
    Raises _UnitError on a row that stops the run."""
    from .sft_preprocess import process_record

    summary = _new_summary()
    lengths = summary["lengths"]
    tmp_prefix = f"{unit_prefix}.tmp-{os.getpid()}"
    tokens_out, mask_out = _DocumentWriter(tmp_prefix, dtype), _DocumentWriter(tmp_prefix + "_loss_mask", numpy.uint8)
    done_rows = 0
    try:
        for item in source.items(unit):
            done_rows += 1
            if tick is not None and done_rows % 64 == 0:
                tick(64)
            try:
                sample = process_record(tokenizer, cfg, item.payload)
            except SampleError as err:
                skippable = cfg.skip_bad or (cfg.truncation == "skip" and err.length is not None)
                if not skippable:
                    raise _UnitError(f"{where(item)}: {err}") from None
                at = item.number if one_file else where(item)
                summary["skipped"] += 1
                if len(summary["skipped_lines"]) < FIRST_SKIPPED:
                    summary["skipped_lines"].append(at)
                _count_skip(summary["reasons"], err.reason, at, err.length)
                continue
            if sample is None:
                continue
            ids, mask, schema = sample
            summary["schemas"][schema] = summary["schemas"].get(schema, 0) + 1
            mask = numpy.asarray(mask, dtype=numpy.uint8)
            tokens_out.add(ids)
            mask_out.add(mask)
            summary["samples"] += 1
            summary["tokens"] += len(ids)
            summary["loss_tokens"] += int(mask.sum())
            lengths[len(ids)] = lengths.get(len(ids), 0) + 1
        tokens_out.finalize()
        mask_out.finalize()
        for tmp, final in zip(output_paths(tmp_prefix), output_paths(unit_prefix)):
            os.replace(tmp, final)
    finally:
        for writer in (tokens_out, mask_out):
            writer.data.close()
        for path in output_paths(tmp_prefix):
            if os.path.exists(path):
                os.remove(path)
        if tick is not None:
            tick(done_rows % 64)
    return summary


def _write_done(path, key, summary):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"key": key, "summary": summary}, f)
    os.replace(tmp, path)


def _read_done(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


_worker = {}


def _init_worker(cfg, dtype, one_file, counter):
    """In a pool process: its own tokenizer and source; it dies with the parent (Linux)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    from .sft_preprocess import load_tokenizer

    _worker.update(cfg=cfg, dtype=dtype, one_file=one_file, counter=counter, source=open_source(cfg.input),
                   tokenizer=load_tokenizer(cfg.tokenizer))


def _tick(n):
    counter = _worker["counter"]
    with counter.get_lock():
        counter.value += n


def _pool_unit(task):
    unit, unit_prefix, key = task
    try:
        summary = run_unit(_worker["tokenizer"], _worker["cfg"], _worker["source"], unit, unit_prefix,
                           _worker["dtype"], _worker["one_file"], _tick)
    except _UnitError as err:
        return None, str(err)
    _write_done(unit_prefix + ".json", key, summary)
    return summary, None


# -- the run ------------------------------------------------------------------------------------------------------


def _add(total, unit):
    for name in ("samples", "tokens", "loss_tokens", "skipped"):
        total[name] += unit[name]
    total["skipped_lines"].extend(unit["skipped_lines"][: FIRST_SKIPPED - len(total["skipped_lines"])])
    for reason, entry in unit["reasons"].items():
        _count_skip(total["reasons"], reason, None, None, entry["count"], entry["first_lines"], entry["min_length"],
                    entry["max_length"])
    for schema, count in unit["schemas"].items():
        total["schemas"][schema] = total["schemas"].get(schema, 0) + count
    for length, count in unit["lengths"].items():
        total["lengths"][int(length)] = total["lengths"].get(int(length), 0) + count


def length_distribution(histogram):
    """p50, p90 and max of the kept samples' token counts (nearest rank) from {length: count}."""
    if not histogram:
        return {"p50": None, "p90": None, "max": None}
    ordered = sorted(histogram)
    counts = numpy.cumsum([histogram[length] for length in ordered])  # samples of at most ordered[i] tokens
    rank = lambda q: ordered[int(numpy.searchsorted(counts, max(1, math.ceil(q * int(counts[-1])))))]  # noqa: E731
    return {"p50": rank(0.5), "p90": rank(0.9), "max": ordered[-1]}


def _unit_name(index):
    return f"{index:06d}"


def _plan(work, units, keys, resume, log):
    """Which units the work directory already holds (their summaries by index); clears the rest."""
    reused, stale = {}, 0
    if os.path.isdir(work):
        for index, key in enumerate(keys):
            done = _read_done(os.path.join(work, _unit_name(index) + ".json"))
            if done is None:
                continue
            if resume and done.get("key") == key and all(
                    os.path.exists(p) for p in output_paths(os.path.join(work, _unit_name(index)))):
                reused[index] = done["summary"]
            else:
                stale += 1
        keep = {_unit_name(i) + suffix for i in reused for suffix in (".bin", ".idx", "_loss_mask.bin",
                                                                         "_loss_mask.idx", ".json")}
        for name in os.listdir(work):
            if name not in keep:
                path = os.path.join(work, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if stale and not resume:
        log(f"{work}: --no-resume: starting over ({stale} finished unit(s) discarded)")
    elif stale and not reused:
        log(f"{work}: the input or the settings changed since the interrupted run: starting over "
            f"({stale} finished unit(s) discarded)")
    elif stale:
        log(f"{work}: {stale} finished unit(s) were made from another input or with other settings: redoing them")
    if reused:
        rows = sum(units[i].rows for i in reused)
        log(f"resuming from {work}: {len(reused)} of {len(units)} unit(s) done ({rows} rows), "
            f"{len(units) - len(reused)} to go")
    return reused


def preprocess(cfg, progress=True, log=None, resume=True, unit_rows=UNIT_ROWS):
    """Write the dataset at cfg.output_prefix; returns the summary (samples, tokens, loss_tokens,
    skipped, skipped_lines, reasons, schemas, lengths: p50/p90/max, input, units, units_reused).
    Raises ValueError naming the file and row on bad input, leaving nothing at the prefix nor
    the work directory. log(line): progress notes (resuming, redoing units). resume=False:
    finished units of an interrupted run are discarded."""
    from .sft_preprocess import load_tokenizer

    log = log or (lambda line: None)
    source = open_source(cfg.input)
    tokenizer = load_tokenizer(cfg.tokenizer)  # fail early, in this process
    if cfg.vocab_size is not None and cfg.vocab_size < len(tokenizer):
        raise ValueError(f"--vocab-size {cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    dtype = token_dtype(cfg.vocab_size or len(tokenizer))
    one_file = len(source.parts) == 1
    work = cfg.output_prefix + WORK_SUFFIX
    units = source.units(unit_rows)
    settings = settings_digest(cfg, unit_rows)
    keys = [unit_key(settings, source, unit) for unit in units]
    reused = _plan(work, units, keys, resume, log)
    os.makedirs(work, exist_ok=True)
    prefixes = [os.path.join(work, _unit_name(i)) for i in range(len(units))]
    pending = [i for i in range(len(units)) if i not in reused]
    total = {**_new_summary(), "input": source.kind, "units": len(units), "units_reused": len(reused)}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=source.total, unit=" samples", desc=os.path.basename(cfg.input.rstrip("/")), file=sys.stderr,
                   initial=sum(units[i].rows for i in reused), smoothing=0.1)
    pool = None
    try:
        if cfg.workers > 1 and len(pending) > 1:
            results, pool = _pooled(cfg, source, units, pending, prefixes, keys, dtype, one_file, bar)
        else:
            results = _in_process(tokenizer, cfg, source, units, pending, prefixes, keys, dtype, one_file, bar)
        for index in range(len(units)):
            if index in reused:
                summary = reused[index]
            else:
                summary, error = next(results)
                if error is not None:
                    raise ValueError(error)
            _add(total, summary)
        if bar is not None:
            bar.close()
        if total["samples"] == 0:
            raise ValueError(f"{cfg.input}: no usable samples")
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output_prefix)), exist_ok=True)
        merged = os.path.join(work, "merged")
        merge(prefixes, merged, dtype)
        merge([p + "_loss_mask" for p in prefixes], merged + "_loss_mask", numpy.uint8)
        for tmp, final in zip(output_paths(merged), output_paths(cfg.output_prefix)):
            os.replace(tmp, final)
    except ValueError:  # bad input: nothing is left behind, nor worth resuming
        _stop(pool)
        shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:  # interrupted: finished units stay for the next run
        _stop(pool)
        raise
    _stop(pool)
    shutil.rmtree(work, ignore_errors=True)
    total["lengths"] = length_distribution(total["lengths"])
    return total


def _in_process(tokenizer, cfg, source, units, pending, prefixes, keys, dtype, one_file, bar):
    tick = bar.update if bar is not None else None
    for index in pending:
        try:
            summary = run_unit(tokenizer, cfg, source, units[index], prefixes[index], dtype, one_file, tick)
        except _UnitError as err:
            yield None, str(err)
            return
        _write_done(prefixes[index] + ".json", keys[index], summary)
        yield summary, None


def _pooled(cfg, source, units, pending, prefixes, keys, dtype, one_file, bar):
    """(results of the pending units in order, the pool): every unit is queued at once (a unit is a
    few numbers); each worker holds one unit's state at a time."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    counter = context.Value("q", 0)
    pool = concurrent.futures.ProcessPoolExecutor(min(cfg.workers, len(pending)), mp_context=context,
                                                  initializer=_init_worker, initargs=(cfg, dtype, one_file, counter))
    futures = [pool.submit(_pool_unit, (units[i], prefixes[i], keys[i])) for i in pending]

    def results():
        for future in futures:
            while True:
                try:
                    result = future.result(timeout=0.5)
                    break
                except concurrent.futures.TimeoutError:
                    if bar is not None:
                        bar.update(counter.value - (bar.n - bar.initial))
            if bar is not None:
                bar.update(counter.value - (bar.n - bar.initial))
            yield result

    return results(), pool


def _stop(pool):
    """Stop the workers now (a unit in progress is abandoned; its files are temporary)."""
    if pool is None:
        return
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=10)
