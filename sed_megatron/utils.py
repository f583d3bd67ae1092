"""Small helpers every layer uses: one-line failures, atomic writes, free ports."""

import contextlib
import os
import sys


class UsageError(ValueError):
    """Bad input from the user; the message is one line naming the file, line, flag or field."""


def fail(message, prog):
    """One line on stderr and exit 2: the way every bad input ends."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def help_sections(doc):
    """argparse's description and epilog from a tool's module docstring: its summary and the
    commands that run it above the options, the notes below them, so that --help shows the
    tool's own options on the first screen (tests/test_tools_help.py)."""
    paragraphs = doc.strip("\n").split("\n\n")
    return {"description": "\n\n".join(paragraphs[:2]), "epilog": "\n\n".join(paragraphs[2:]) or None}


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` that replaces it when the block completes; removed on failure.

    Readers never see a half-written file: they find the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    root, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(directory, f".{root}.tmp-{os.getpid()}{ext}")  # keep the extension (matplotlib reads it)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """A file opened for writing beside `path`, synced and renamed over it when the block completes."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path, text):
    with atomic_open(path) as f:
        f.write(text)


@contextlib.contextmanager
def quiet_stdout(enabled=True):
    """Megatron's start-up banners (printed to stdout) are kept out of a tool's output; the tool
    prints its result after the block. enabled=False (a tool's --verbose) lets them through."""
    if not enabled:
        yield
        return
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


ONE_PROCESS_WORLD = "tcp://127.0.0.1:0"
"""init_method of a torch.distributed world of one process: its store binds a port the system
picks (a port found free and bound later can be taken in between; no other process connects)."""
