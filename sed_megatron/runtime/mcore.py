"""What every run of the pip-installed megatron-core needs, on GPUs and on the CPU alike.

- The version: our hooks on Megatron-LM's loop are written against megatron-core 0.19.x.
- The dataset helpers: Megatron-LM's `initialize` runs `compile_helpers()` on rank 0, which
  runs `make` in megatron/core/datasets and exits the process when that fails. The wheel ships
  the built `helpers_cpp` extension but no Makefile, so `make` fails on every machine. The
  replacement imports the built extension and only falls back to `make` where a source tree
  (a Makefile) is there.
- Hooks: `check_signature` holds a Megatron function against the parameters a wrapper of ours
  relies on, so a Megatron that changed them stops with one line instead of misbehaving.
- The checkpoint tracker (latest_checkpointed_iteration.txt) is replaced atomically, so a
  process killed while saving always leaves it naming a complete checkpoint.
- Start-up and saves: the parser's help texts are read once per process, and a synchronous
  save collects its write results without starting a helper process.
"""

import functools
import inspect
import os

SUPPORTED_VERSIONS = ((0, 19, 2), (0, 20, 0))
"""[lowest, first unsupported) megatron-core versions the hooks and the CPU layer were written for."""


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is outside what this project supports; one line."""


def _version_tuple(text):
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(text).release
    except InvalidVersion:
        raise MegatronVersionError(f"megatron-core reports an unreadable version {text!r}") from None
    return tuple(release[:3]) + (0,) * (3 - len(release[:3]))


def installed_version():
    from megatron.core.package_info import __version__

    return __version__


def check_version(version=None):
    """MegatronVersionError unless `version` (default: the installed one) is in SUPPORTED_VERSIONS."""
    version = version or installed_version()
    low, high = SUPPORTED_VERSIONS
    if not low <= _version_tuple(version) < high:
        supported = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high[:2]))}"
        raise MegatronVersionError(f"megatron-core {version} is installed; sed_megatron supports megatron-core{supported} "
                                   f"(pip install 'megatron-core{supported}', or use requirements/lock.txt)")
    return version


def check_signature(func, expected, purpose, keywords=()):
    """MegatronVersionError unless func's leading parameters are named `expected` (in order) and it
    takes the `keywords` too."""
    names = list(inspect.signature(func).parameters)
    if names[: len(expected)] != list(expected) or not set(keywords) <= set(names):
        where = f"{func.__module__}.{func.__qualname__}"
        wanted = ", ".join([*expected, *(f"{k}=" for k in keywords)])
        raise MegatronVersionError(f"{where}({', '.join(names)}) does not take ({wanted}), which {purpose} relies on: "
                                   f"megatron-core {installed_version()} is not supported")


def use_prebuilt_dataset_helpers():
    """compile_helpers() that imports the wheel's built extension instead of running `make`."""
    import megatron.core.datasets.utils as dataset_utils

    if getattr(dataset_utils.compile_helpers, "_sed_megatron", False):
        return
    compile_with_make = dataset_utils.compile_helpers
    source_dir = os.path.dirname(os.path.abspath(dataset_utils.__file__))

    def compile_helpers():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
            return
        except ImportError:
            pass
        if os.path.exists(os.path.join(source_dir, "Makefile")):
            return compile_with_make()  # a source checkout: build it as Megatron does
        raise RuntimeError(f"{source_dir}: megatron-core's dataset helpers (helpers_cpp) are neither built nor "
                           f"buildable (no Makefile); reinstall megatron-core from its wheel")

    compile_helpers._sed_megatron = True
    dataset_utils.compile_helpers = compile_helpers


TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""Megatron-LM's pointer to the newest complete checkpoint of a --save directory."""


def checkpoint_iteration_dir(load, iteration=None):
    """The directory of the iteration Megatron's tracker file in `load` points to (torch_dist), or
    of `iteration` when given."""
    from sed_megatron.utils import UsageError

    if iteration is not None:
        directory = os.path.join(load, f"iter_{int(iteration):07d}")
        if not os.path.isdir(directory):
            raise UsageError(f"{directory}: missing (no checkpoint of iteration {iteration} in {load})")
        return directory
    tracker = os.path.join(load, TRACKER_FILE)
    if not os.path.exists(tracker):
        raise UsageError(f"{tracker}: missing (not a Megatron checkpoint directory)")
    with open(tracker) as f:
        text = f.read().strip()
    if text == "release":
        return os.path.join(load, "release")
    try:
        return os.path.join(load, f"iter_{int(text):07d}")
    except ValueError:
        raise UsageError(f"{tracker}: {text!r} is neither an iteration nor 'release'") from None


class _AtomicTrackerStorage:
    """Megatron's storage helper (`maybe_msc`), except that the tracker file is replaced atomically.

    Megatron rewrites latest_checkpointed_iteration.txt in place (open 'w', write): a process
    killed in between leaves it empty, and the run can no longer resume."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def open(self, path, mode="r", *args, **kwargs):
        from megatron.core.msc_utils import MultiStorageClientFeature

        local = not MultiStorageClientFeature.is_enabled()
        if local and "w" in mode and os.path.basename(os.fspath(path)) == TRACKER_FILE:
            from sed_megatron.utils import atomic_open

            return atomic_open(path, mode)
        return self._inner.open(path, mode, *args, **kwargs)


def write_tracker_atomically():
    import megatron.training.checkpointing as checkpointing

    if not isinstance(checkpointing.maybe_msc, _AtomicTrackerStorage):
        checkpointing.maybe_msc = _AtomicTrackerStorage(checkpointing.maybe_msc)


def save_results_in_process():
    """A synchronous torch_dist save writes in the saving process, yet Megatron collects the write
    results through a queue of a multiprocessing Manager: a server process spawned on the first
    save (seconds: it imports the entry point again) that outlives a rank killed with kill -9. An
    in-process queue does the same for synchronous saves. Not with --async-save: its writes run in
    another process. Idempotent; nothing once Megatron has made its queue."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


def cache_argument_docstrings():
    """Megatron-LM's parser takes its help texts from the docstrings of config dataclass fields,
    read by parsing each class's source (inspect.getsource and ast.parse: 0.2 s a parser, and a
    start-up builds several). The texts depend on the class alone: read once per class."""
    from megatron.training.argument_utils import ArgumentGroupFactory

    read = ArgumentGroupFactory._get_field_docstrings
    if getattr(read, "cached_by_sed_megatron", False):
        return
    texts = {}

    @functools.wraps(read)
    def cached(self, src_cfg_class):
        if src_cfg_class not in texts:
            texts[src_cfg_class] = read(self, src_cfg_class)
        return dict(texts[src_cfg_class])

    cached.cached_by_sed_megatron = True
    ArgumentGroupFactory._get_field_docstrings = cached


def prepare_megatron():
    """Every machine: check the version, use the built dataset helpers, write the checkpoint
    tracker atomically, read the parser's help texts once. Idempotent."""
    check_version()
    use_prebuilt_dataset_helpers()
    write_tracker_atomically()
    cache_argument_docstrings()
