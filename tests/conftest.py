"""Shared fixtures. The default model's weights are read once per session and shared by every engine."""

from __future__ import annotations

import os

import pytest
import torch

# Two threads match the CI machine; more only adds contention there.
torch.set_num_threads(int(os.environ.get("STAGESERVE_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
