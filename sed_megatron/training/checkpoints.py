"""Megatron checkpoints around a run: checked before the first step, pruned after each save.

    problem = checkpoint_problem(path)       # None, or one line naming the file that is not whole
    notice, older = check_load(load, ckpt_step, fallback)
    deleted = prune(save, keep_last)         # global rank 0, after a save the tracker names

A torch_dist checkpoint (`iter_NNNNNNN/`, written by training and by tools/convert_hf_to_mcore.py;
a LoRA run's adapters too) is whole when its `.metadata` (torch DCP's: every item's file, offset
and length) reads, every file it lists is at least as long as the items in it say, and
Megatron's `metadata.json` (and `common.pt`, where there is one) reads. The check reads the
metadata and stats the files, never a tensor: a copy cut short, a save killed before its
metadata, a shard deleted, each ends as one line naming the file before Megatron reads it.

`--load-fallback` loads the newest older complete checkpoint of the same directory instead
(Megatron's `--ckpt-step`); `--save-keep-last N` deletes the older ones once a newer one is
complete; `--inject-save-error ITERATION:ENOSPC` makes one save's write fail (testing).
"""

import errno
import functools
import json
import os
import pickle
import re
import shutil
import zipfile

from sed_megatron.runtime.mcore import TRACKER_FILE, save_results_in_process

DCP_METADATA = ".metadata"
"""torch.distributed.checkpoint's metadata: {item: (file, offset, length)}, written last by a save."""
MEGATRON_METADATA = "metadata.json"
COMMON_STATE = "common.pt"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
INJECTABLE_ERRORS = ("ENOSPC", "EIO", "EDQUOT")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message is one line naming the file."""


def iteration_dir(directory, iteration):
    """Megatron's directory of one checkpoint: iter_0000004, or release."""
    return os.path.join(directory, "release" if iteration == "release" else f"iter_{int(iteration):07d}")


def tracked_iteration(directory):
    """The iteration the tracker file of `directory` names (an int, or "release"), None without a
    tracker; CheckpointError naming the tracker when it names neither."""
    tracker = os.path.join(directory, TRACKER_FILE)
    try:
        with open(tracker) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CheckpointError(f"{tracker}: unreadable ({err.strerror})") from None
    if text == "release":
        return text
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: {text!r} is neither an iteration nor 'release'")
    return int(text)


def iterations(directory):
    """The iterations of the iter_* directories in `directory`, ascending (complete or not)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = (_ITER_DIR.match(name) for name in names)
    return sorted(int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(directory, m.group(0))))


def _first_line(err):
    return (str(err).splitlines() or [""])[0]


def checkpoint_problem(path):
    """None when the torch_dist checkpoint directory `path` is whole, else one line naming the file:
    missing, unreadable, or shorter than its metadata says. Reads the metadata, stats the files."""
    if not os.path.isdir(path):
        return f"{path}: missing"
    metadata_path = os.path.join(path, DCP_METADATA)
    if not os.path.exists(metadata_path):
        return f"{metadata_path}: missing (the save of this checkpoint did not finish)"
    try:
        with open(metadata_path, "rb") as f:
            metadata = pickle.load(f)  # what torch's FileSystemReader.read_metadata does
        storage = metadata.storage_data
        needed = {}  # file -> bytes its items end at
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as err:  # noqa: BLE001 - any failure to read it is the one line
        return f"{metadata_path}: unreadable ({type(err).__name__}: {_first_line(err)})"
    for name in sorted(needed):
        file = os.path.join(path, name)
        try:
            size = os.stat(file).st_size
        except FileNotFoundError:
            return f"{file}: missing ({DCP_METADATA} lists {needed[name]} bytes of items in it)"
        if size < needed[name]:
            return f"{file}: truncated: {size} of {needed[name]} bytes"
    megatron_path = os.path.join(path, MEGATRON_METADATA)
    try:
        with open(megatron_path) as f:
            json.load(f)
    except FileNotFoundError:
        return f"{megatron_path}: missing"
    except (OSError, ValueError) as err:
        return f"{megatron_path}: unreadable ({type(err).__name__}: {_first_line(err)})"
    common = os.path.join(path, COMMON_STATE)
    if os.path.exists(common):
        try:  # torch.save's zip: its central directory, at the end, is gone from a cut copy
            with zipfile.ZipFile(common) as archive:
                archive.namelist()
        except (OSError, zipfile.BadZipFile) as err:
            return f"{common}: unreadable ({type(err).__name__}: {_first_line(err)})"
    return None


def newest_complete(directory, below):
    """The newest iteration below `below` whose checkpoint in `directory` is whole, or None."""
    for iteration in reversed(iterations(directory)):
        if iteration < below and checkpoint_problem(iteration_dir(directory, iteration)) is None:
            return iteration
    return None


def check_load(load, ckpt_step=None, fallback=False):
    """The checkpoint that --load (and --ckpt-step) resolves to, checked before Megatron reads it.

    (None, None): whole, or no checkpoint there. (notice, iteration): not whole, and fallback
    loads `iteration` instead (the newest older complete one; Megatron's --ckpt-step). Else
    CheckpointError, one line naming the file and the older iteration --load-fallback would load."""
    if ckpt_step:  # Megatron's own rule: --ckpt-step (0: not given) wins over the tracker
        iteration, named_by = ckpt_step, f"--ckpt-step {ckpt_step}"
    else:
        iteration, named_by = tracked_iteration(load), os.path.join(load, TRACKER_FILE)
    if iteration is None:
        return None, None
    problem = checkpoint_problem(iteration_dir(load, iteration))
    if problem is None:
        return None, None
    what = f"the checkpoint of iteration {iteration}, which {named_by} names"
    older = newest_complete(load, iteration) if iteration != "release" else None
    if older is None:
        raise CheckpointError(f"{problem} ({what}); no older complete checkpoint in {load}")
    if not fallback:
        raise CheckpointError(f"{problem} ({what}); --load-fallback would load iteration {older}, the newest "
                              f"complete one in {load}")
    return (f"{problem} ({what}): loading iteration {older} instead, the newest complete checkpoint in {load} "
            f"(--load-fallback)"), older


def prune(save, keep_last):
    """Delete the checkpoints of `save` beyond the keep_last newest complete ones, counting the one
    the tracker names and those older than it; iter_* directories older than the tracker's that
    are not whole (a failed save's leftovers) go too. Newer directories than the tracker's (a
    save being written) are never touched. Returns the iterations deleted. Global rank 0 only."""
    tracked = tracked_iteration(save)
    if not isinstance(tracked, int) or keep_last < 1:
        return []
    kept, deleted = 1, []
    for iteration in reversed([i for i in iterations(save) if i < tracked]):
        path = iteration_dir(save, iteration)
        if kept < keep_last and checkpoint_problem(path) is None:
            kept += 1
            continue
        # Renamed first: a directory half deleted never looks like a checkpoint.
        doomed = os.path.join(save, f".deleting-{os.path.basename(path)}")
        try:
            os.rename(path, doomed)
            shutil.rmtree(doomed)
        except OSError as err:
            print(f"sed_megatron: --save-keep-last: could not delete {path} ({err.strerror}); training goes on",
                  flush=True)
            continue
        deleted.append(iteration)
    return deleted


def parse_save_error(text):
    """(iteration, errno code) of --inject-save-error ITERATION:ENOSPC; ValueError naming the flag."""
    iteration, _, name = (text or "").partition(":")
    if not iteration.isdigit() or int(iteration) < 1 or name not in INJECTABLE_ERRORS:
        raise ValueError(f"--inject-save-error {text!r}: expected ITERATION:{'|'.join(INJECTABLE_ERRORS)} "
                         f"(an iteration that saves)")
    return int(iteration), getattr(errno, name)


_write_errors = []  # the first exception a checkpoint write met in this process (Megatron wraps it)


def first_write_error():
    """The OSError (or other exception) a checkpoint file's write raised in this process, if any:
    Megatron reports it as 'worker failed', without its errno."""
    return _write_errors[0] if _write_errors else None


_hooks = {}  # what the wrappers read: installed once per process, settings replaced per run


def install_save_hooks(save_dir, keep_last=None, save_error=None, log=print, synchronous=True):
    """Wrap Megatron's checkpoint writer and saves: the first write error is kept (for the one line
    of a failing save), keep_last prunes save_dir after each save on global rank 0, and save_error =
    (iteration, errno) makes the write of that iteration's save raise OSError(errno) after its
    first item (testing: a full disk). synchronous (no --async-save): the write results are
    collected in-process (runtime.mcore.save_results_in_process). A second call (another run in
    this process) replaces the settings; the wrappers are installed once."""
    _write_errors.clear()
    if synchronous:
        save_results_in_process()
    _hooks.update(save_dir=save_dir, keep_last=keep_last, save_error=save_error, log=log, armed=False, items=0)
    if _hooks.get("installed"):
        return
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fs_async
    import megatron.training.training as training_loop

    from sed_megatron.runtime import check_signature

    writer = fs_async.FileSystemWriterAsync
    write = writer.write_preloaded_data  # passed through whatever it takes (a test's wrapper too): only its
    #                                      result, (worker index, results or the exception it met), is read
    save = training_loop.save_checkpoint_and_time
    check_signature(save, ("iteration", "model"), "sed_megatron's hooks on saves (training/checkpoints.py)",
                    keywords=("non_persistent_ckpt",))
    write_item = fs_async._write_item

    @functools.wraps(write)
    def write_preloaded_data(*args, **kwargs):
        result = write(*args, **kwargs)
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], BaseException):
            _write_errors.append(result[1])
        return result

    @functools.wraps(write_item)  # Megatron reads its signature
    def failing_write_item(*args, **kwargs):
        if _hooks["armed"]:
            _hooks["items"] += 1
            if _hooks["items"] > 1:  # the file exists and holds its first item: a disk that filled up
                code = _hooks["save_error"][1]
                raise OSError(code, os.strerror(code))
        return write_item(*args, **kwargs)

    @functools.wraps(save)
    def save_checkpoint_and_time(iteration, *args, **kwargs):
        import torch.distributed as dist

        injected = _hooks["save_error"]
        _hooks.update(armed=injected is not None and iteration == injected[0], items=0)
        try:
            result = save(iteration, *args, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # torch's CheckpointException is a BaseException
            cause = first_write_error()
            if isinstance(cause, OSError) and cause is not err:  # Megatron's "worker failure" hides the errno
                raise cause from err
            if isinstance(err, Exception):
                raise
            from megatron.core.dist_checkpointing.core import CheckpointingException

            raise CheckpointingException(_first_line(err)) from err  # what main reports as a failing save
        finally:
            _hooks["armed"] = False
        keep, directory = _hooks["keep_last"], _hooks["save_dir"]
        if keep and directory and not kwargs.get("non_persistent_ckpt", False) and dist.get_rank() == 0:
            deleted = prune(directory, keep)  # after the save's barrier: the tracker names it
            if deleted:
                _hooks["log"](f"sed_megatron: --save-keep-last {keep}: deleted the checkpoints of iteration(s) "
                              f"{', '.join(map(str, deleted))} in {directory}", flush=True)
        return result

    writer.write_preloaded_data = staticmethod(write_preloaded_data)
    fs_async._write_item = failing_write_item
    training_loop.save_checkpoint_and_time = save_checkpoint_and_time
    _hooks["installed"] = True
