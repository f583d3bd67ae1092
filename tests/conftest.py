"""Tests marked `gpu` are skipped where torch sees no GPU (CI and the 2-core dev machine).

SED_MEGATRON_GPU_TESTS_ON_CPU=1 runs them anyway, on the CPU layer: a dry run of the GPU script."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available() or os.environ.get("SED_MEGATRON_GPU_TESTS_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (pytest -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    """Stop the processes tests/distributed.py kept for the session."""
    from tests.distributed import close_all

    close_all()
