"""Corrupt inputs found before the first step, retention and the save-directory lock, in-process:
a checkpoint whose metadata or shard is missing or cut short, --load-fallback's choice, an indexed
dataset whose .bin is short or whose mask does not match, --save-keep-last's deletions, the lock
of a live run, a dead one and a restarted one. (Whole runs: test_checkpoint_faults.py.)"""

import json
import os
import subprocess
import sys
import time

import pytest

from sed_megatron.training import checkpoints, save_lock
from sed_megatron.training.checkpoints import CheckpointError, check_load, checkpoint_problem, prune


def write_checkpoint(save, iteration, track=True):
    """A torch_dist checkpoint as Megatron lays it out (.metadata, one .distcp, metadata.json),
    written by torch's own DCP writer; the tracker names it when track."""
    import torch
    import torch.distributed.checkpoint as dcp

    path = checkpoints.iteration_dir(save, iteration)
    state = {"w": torch.arange(1000, dtype=torch.float32) + iteration, "b": torch.ones(10)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path, single_file_per_rank=True), no_dist=True)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, f)
    if track:
        with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    return path


def shard(path):
    return os.path.join(path, next(name for name in os.listdir(path) if name.endswith(".distcp")))


def test_a_whole_checkpoint_passes_and_each_cut_is_named(tmp_path):
    path = write_checkpoint(str(tmp_path), 2)
    assert checkpoint_problem(path) is None
    data = shard(path)
    size = os.path.getsize(data)
    with open(data, "r+b") as f:
        f.truncate(size - 100)
    assert checkpoint_problem(path) == f"{data}: truncated: {size - 100} of {size} bytes"
    os.remove(data)
    assert checkpoint_problem(path).startswith(f"{data}: missing (.metadata lists {size} bytes")
    with open(os.path.join(path, ".metadata"), "wb") as f:
        f.write(b"\x80\x04 not a pickle")
    assert checkpoint_problem(path).startswith(f"{path}/.metadata: unreadable (")
    os.remove(os.path.join(path, ".metadata"))
    assert checkpoint_problem(path) == f"{path}/.metadata: missing (the save of this checkpoint did not finish)"
    assert checkpoint_problem(str(tmp_path / "iter_0000009")) == f"{tmp_path}/iter_0000009: missing"
    other = write_checkpoint(str(tmp_path), 4)
    os.remove(os.path.join(other, "metadata.json"))
    assert checkpoint_problem(other) == f"{other}/metadata.json: missing"
    with open(os.path.join(other, "metadata.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(other, "common.pt"), "wb") as f:
        f.write(b"PK\x03\x04 cut short")
    assert checkpoint_problem(other).startswith(f"{other}/common.pt: unreadable (BadZipFile")


def test_load_names_the_file_and_the_fallback(tmp_path):
    save = str(tmp_path)
    write_checkpoint(save, 2)
    write_checkpoint(save, 4)
    newest = write_checkpoint(save, 6)
    assert check_load(save) == (None, None)
    data = shard(newest)
    with open(data, "r+b") as f:
        f.truncate(10)
    # Without the flag: the file, who named the checkpoint, and what --load-fallback would load.
    with pytest.raises(CheckpointError) as err:
        check_load(save)
    assert str(err.value) == (f"{data}: truncated: 10 of {os.path.getsize(shard(checkpoints.iteration_dir(save, 4)))}"
                              f" bytes (the checkpoint of iteration 6, which {save}/latest_checkpointed_iteration.txt "
                              f"names); --load-fallback would load iteration 4, the newest complete one in {save}")
    # iteration 4 cut too: the fallback goes back to 2
    os.remove(os.path.join(checkpoints.iteration_dir(save, 4), ".metadata"))
    notice, older = check_load(save, fallback=True)
    assert older == 2 and notice.endswith(f"loading iteration 2 instead, the newest complete checkpoint in {save} "
                                          f"(--load-fallback)")
    # --ckpt-step names the checkpoint instead of the tracker
    assert check_load(save, ckpt_step=2) == (None, None)
    with pytest.raises(CheckpointError, match=r"iteration 4, which --ckpt-step 4 names\); --load-fallback would "
                                              r"load iteration 2"):
        check_load(save, ckpt_step=4)
    # nothing older: no fallback to offer
    os.remove(os.path.join(checkpoints.iteration_dir(save, 2), "metadata.json"))
    with pytest.raises(CheckpointError, match=r"names\); no older complete checkpoint in "):
        check_load(save, fallback=True)
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("")
    with pytest.raises(CheckpointError, match=r"latest_checkpointed_iteration\.txt: '' is neither an iteration"):
        check_load(save)


def test_keep_last_keeps_the_newest_complete_and_never_a_newer_one(tmp_path, capsys):
    save = str(tmp_path)
    for iteration in (2, 4, 6, 8):
        write_checkpoint(save, iteration)
    partial = write_checkpoint(save, 7, track=False)  # a failed save's leftovers, older than the tracker's
    os.remove(os.path.join(partial, ".metadata"))
    write_checkpoint(save, 10, track=False)  # being written: newer than the tracker's
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("8")
    assert prune(save, 2) == [7, 4, 2]
    assert checkpoints.iterations(save) == [6, 8, 10]
    assert not [name for name in os.listdir(save) if name.startswith(".deleting")]
    assert prune(save, 2) == []
    assert prune(save, 1) == [6]
    assert checkpoints.iterations(save) == [8, 10]


def write_indexed(prefix, lengths, mask_lengths=None):
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    for path, dtype, sizes in ((prefix, numpy.int32, lengths), (prefix + "_loss_mask", numpy.uint8,
                                                                  mask_lengths or lengths)):
        builder = IndexedDatasetBuilder(path + ".bin", dtype=dtype)
        for n in sizes:
            builder.add_item(torch.ones(n, dtype=torch.int32 if dtype is numpy.int32 else torch.uint8))
            builder.end_document()
        builder.finalize(path + ".idx")


def test_indexed_data_short_bin_and_mismatched_masks(tmp_path):
    from sed_megatron.data.integrity import indexed_sft_problem

    prefix = str(tmp_path / "ds")
    write_indexed(prefix, [5, 7, 9])
    assert indexed_sft_problem(prefix) is None
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(60)
    assert indexed_sft_problem(prefix) == f"{prefix}.bin: truncated: 60 of 84 bytes (its ds.idx says)"
    write_indexed(prefix, [5, 7, 9], [5, 8, 9])
    assert indexed_sft_problem(prefix) == (f"{prefix}_loss_mask.idx: sample 1 has 8 loss-mask values but 7 tokens "
                                           f"in {prefix}.idx (1 samples differ: files of two different datasets?)")
    write_indexed(prefix, [5, 7, 9], [5, 7])
    assert indexed_sft_problem(prefix).startswith(f"{prefix}_loss_mask.idx: 2 loss-mask sequences but {prefix}.idx "
                                                  f"has 3 token sequences")
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(40)
    assert indexed_sft_problem(prefix).startswith(f"{prefix}.idx: unreadable index (")
    os.remove(prefix + "_loss_mask.bin")
    assert indexed_sft_problem(prefix).startswith(f"{prefix}_loss_mask.bin: missing")


def lock_file(save, **record):
    path = os.path.join(save, save_lock.LOCK_FILE)
    with open(path, "w") as f:
        json.dump(record, f)
    return path


def test_the_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path, monkeypatch):
    import socket

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    host, save = socket.gethostname(), str(tmp_path / "save")
    lock = save_lock.SaveLock.acquire(save)  # a new directory: made, locked
    record = json.load(open(os.path.join(save, save_lock.LOCK_FILE)))
    assert (record["host"], record["pid"], record["run_id"]) == (host, os.getpid(), None) and lock.notice is None
    lock.release()
    assert not os.path.exists(save)  # made by the lock, left empty: removed

    os.makedirs(save)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = save_lock._start(other.pid)
        lock_file(save, host=host, pid=other.pid, pid_start=start, run_id=None, started="then")
        with pytest.raises(save_lock.SaveDirBusy) as err:
            save_lock.SaveLock.acquire(save)
        assert str(err.value).startswith(f"--save {save} is being written by another run (host {host}, pid "
                                         f"{other.pid}, started then; its lock: {save}/.sed_megatron.lock)")
        # the same pid, started at another time: the pid was reused, its run is gone
        lock_file(save, host=host, pid=other.pid, pid_start=str(int(start) + 1), run_id=None, started="then")
        lock = save_lock.SaveLock.acquire(save)
        assert lock.notice.endswith(f"(host {host}, pid {other.pid}, started then; pid {other.pid} is not running)")
        lock.release()
    finally:
        other.kill()
        other.wait()
    # a dead pid on this host
    lock_file(save, host=host, pid=other.pid, pid_start=start, run_id=None, started="then")
    lock = save_lock.SaveLock.acquire(save)
    assert lock.notice == (f"took over the lock {save}/.sed_megatron.lock of a run that is gone (host {host}, pid "
                           f"{other.pid}, started then; pid {other.pid} is not running)")
    assert json.load(open(lock.path))["pid"] == os.getpid()
    lock.release()
    assert os.path.isdir(save) and os.listdir(save) == []  # the directory was there before: kept

    # another host: alive while its heartbeat is fresh, dead once it is older than STALE_AFTER_S
    path = lock_file(save, host="elsewhere", pid=1, pid_start=None, run_id=None, started="then")
    with pytest.raises(save_lock.SaveDirBusy, match=r"\(host elsewhere, pid 1, started then"):
        save_lock.SaveLock.acquire(save)
    old = time.time() - save_lock.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    lock = save_lock.SaveLock.acquire(save)
    assert "; its heartbeat stopped " in lock.notice
    lock.release()

    # a torchrun restart: the same run id (on another node too) is ours, and so is our agent's pid
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-17")
    lock_file(save, host="elsewhere", pid=1, pid_start=None, run_id="job-17", started="then")
    lock = save_lock.SaveLock.acquire(save)
    assert lock.notice is None and json.load(open(lock.path))["run_id"] == "job-17"
    lock.release()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --rdzv-id: the agent's pid decides
    lock_file(save, host=host, pid=os.getppid(), pid_start=save_lock._start(os.getppid()), run_id=None, started="x")
    lock = save_lock.SaveLock.acquire(save)
    assert lock.notice is None and json.load(open(lock.path))["pid"] == os.getppid()
    lock.release()
    assert not os.path.exists(lock.path)


def test_the_heartbeat_touches_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(save_lock, "HEARTBEAT_S", 0.05)
    lock = save_lock.SaveLock.acquire(str(tmp_path))
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    deadline = time.time() + 30
    while os.path.getmtime(lock.path) < old + 500 and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.getmtime(lock.path) > old + 500
    lock.release()
    assert not lock._thread.is_alive() or lock._thread.join(5) is None and not lock._thread.is_alive()


def test_yaml_checkpoint_keys_reach_their_flags(tmp_path):
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    from sed_megatron.training.arguments import add_sed_arguments, expand_config

    parser = add_sed_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    path = tmp_path / "run.yaml"
    path.write_text("checkpoint: {save: runs/x, save_interval: 10, keep_last: 3, load_fallback: true}\n")
    sources = {}
    args = parser.parse_args(expand_config(["--config", str(path)], parser, sources))
    assert (args.save, args.save_interval, args.save_keep_last, args.load_fallback) == ("runs/x", 10, 3, True)
    assert sources["save_keep_last"] == f"{path}: checkpoint.keep_last"
    args = parser.parse_args(expand_config(["--config", str(path), "--save-keep-last", "1"], parser))
    assert args.save_keep_last == 1  # the command line wins
    assert checkpoints.parse_save_error("4:ENOSPC") == (4, 28)
    with pytest.raises(ValueError, match=r"--inject-save-error '0:ENOSPC': expected ITERATION:ENOSPC\|EIO\|EDQUOT"):
        checkpoints.parse_save_error("0:ENOSPC")


def test_an_unreadable_lock_is_left_while_young_and_taken_over_once_old(tmp_path, monkeypatch):
    monkeypatch.setattr(save_lock.time, "sleep", lambda s: None)
    path = os.path.join(tmp_path, save_lock.LOCK_FILE)
    open(path, "w").close()  # another run between creating it and writing it (no hard links there)
    with pytest.raises(save_lock.SaveDirBusy, match=r"could not take its lock .* unreadable and younger than 60 s"):
        save_lock.SaveLock.acquire(str(tmp_path))
    old = time.time() - 3600
    os.utime(path, (old, old))
    lock = save_lock.SaveLock.acquire(str(tmp_path))
    assert lock.notice.endswith("(unknown; the lock file is not readable JSON)")
    lock.release()
    assert os.listdir(tmp_path) == []
