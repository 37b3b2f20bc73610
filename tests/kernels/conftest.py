"""Kernel tests: on CUDA when there is a GPU, else on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels (it is read at decoration), so
this runs before any test module imports `stageserve.kernels`.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import zlib

import torch

if importlib.util.find_spec("triton") is None:  # a CPU-only torch without Triton: nothing here can run
    collect_ignore_glob = ["test_*.py"]
elif not torch.cuda.is_available():
    assert "stageserve.kernels.paged_decode_attention" not in sys.modules, (
        "stageserve.kernels was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1"
    )
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
# Fresh inputs every session; the header prints the seed so a failure can be replayed.
SESSION_SEED = int(os.environ.get("STAGESERVE_KERNEL_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    mode = "CUDA" if ON_GPU else "CPU, Triton interpreter"
    return f"kernel tests: {mode}; seed {SESSION_SEED} (set STAGESERVE_KERNEL_SEED to replay)"


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture
def gen(device, request) -> torch.Generator:
    """A generator per test: the session seed mixed with the test's id, so each case draws its own inputs."""
    seed = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    return torch.Generator(device=device).manual_seed(seed)
