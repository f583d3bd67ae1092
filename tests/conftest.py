"""Tests marked `gpu` are skipped where torch sees no GPU (CI and the 2-core dev machine).

SED_MEGATRON_GPU_TESTS_ON_CPU=1 runs them anyway, on the CPU layer: a dry run of the GPU script.

The modules whose checks run on the processes tests/distributed.py keeps (run_distributed) run
first, in their order; those processes are stopped before the first other test, so that they do
not hold memory while the training runs start processes of their own."""

import os

import pytest


def _uses_kept_processes(item):
    from tests import distributed

    return getattr(getattr(item, "module", None), "run_distributed", None) is distributed.run_distributed


def pytest_collection_modifyitems(config, items):
    import torch

    items.sort(key=lambda item: not _uses_kept_processes(item))  # stable: the order within each part stays
    if torch.cuda.is_available() or os.environ.get("SED_MEGATRON_GPU_TESTS_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (pytest -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    if not _uses_kept_processes(item):
        from tests.distributed import close_all

        close_all()


def pytest_sessionfinish(session, exitstatus):
    """Stop the processes tests/distributed.py kept for the session."""
    from tests.distributed import close_all

    close_all()
