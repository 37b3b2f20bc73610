"""Start a tensor-parallel engine: rank 0 in this process, ranks 1..N-1 as child processes.

Why rank 0 stays in the worker's own process: the scheduler, the sampler and the gRPC stage around
them are unchanged, a step costs rank 0 no extra hop (it computes its own shard, then samples on
logits it already holds), and a TP=1 worker is the same code minus the broadcast. The children are
plain `python -m stageserve.engine.parallel.rank_worker` processes configured by command-line
strings (the engine config travels as JSON): nothing is pickled. Each child loads only its own
slices, concurrently with rank 0, and dies with its parent (it watches its parent pid).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import weakref

import torch

from stageserve.common.errors import InvalidArgumentError, ModelLoadError
from stageserve.engine.config import EngineConfig
from stageserve.engine.loader.weights import LoadedModel
from stageserve.engine.parallel.comm import TPCommunicator, open_store
from stageserve.engine.parallel.runner import TensorParallelRunner, terminate_processes
from stageserve.engine.parallel.sharding import ModelShard

logger = logging.getLogger(__name__)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """Rank r runs on the r-th GPU after the configured one, or on the CPU (gloo; for tests)."""
    if device.type == "cpu":  # gloo over loopback: right answers, no speed-up; for tests
        return [device] * size
    if device.type != "cuda":
        raise InvalidArgumentError("device", f"tensor parallelism runs on cuda or cpu, not {device.type}")
    first, visible = device.index or 0, torch.cuda.device_count()
    if first + size > visible:
        raise InvalidArgumentError(
            "tensor_parallel_size",
            f"{size} ranks from cuda:{first} need {first + size} GPUs, but {visible} are visible",
        )
    return [torch.device("cuda", first + r) for r in range(size)]


def start_tensor_parallel(
    loaded: LoadedModel, config: EngineConfig, *, device: torch.device, dtype: torch.dtype, **runner_kwargs
) -> TensorParallelRunner:
    """Rank 0's runner, once every rank has loaded its shard. `loaded` may hold the full weights or
    rank 0's shard already; the children reload `loaded.source` (a model name or path) themselves."""
    size = config.tensor_parallel_size
    shard = ModelShard(loaded.config, 0, size)
    if loaded.shard is not None and loaded.shard != shard:
        raise ModelLoadError(f"weights were loaded as rank {loaded.shard.rank} of {loaded.shard.size}, not rank 0 of {size}")
    devices = rank_devices(device, size)
    store = open_store(0, size)
    children = [_spawn(rank, size, store.port, loaded.source, devices[rank], dtype, config) for rank in range(1, size)]
    try:
        if devices[0].type == "cuda":
            torch.cuda.set_device(devices[0])
        comm = TPCommunicator(store, 0, size, devices[0])
        state = loaded.state_dict if loaded.shard == shard else shard.shard_state_dict(loaded.state_dict)
        runner = TensorParallelRunner(shard, config, state, comm, device=devices[0], dtype=dtype, **runner_kwargs)
        if not comm.all_ok(True):
            raise RuntimeError("a tensor-parallel rank failed to load its shard (see its log above)")
    except BaseException:
        terminate_processes(children)
        raise
    runner.children = children
    runner.store = store  # the store lives as long as the groups that use it
    weakref.finalize(runner, terminate_processes, children)  # e.g. at interpreter exit without close()
    logger.info("tensor parallel: %d ranks on %s", size, ", ".join(map(str, devices)))
    if not shard.is_even:
        heads = [shard.for_rank(r).heads_per_rank for r in range(size)]
        logger.warning("%d KV heads do not split evenly over %d ranks: attention heads per rank %s", loaded.config.num_kv_heads, size, heads)
    return runner


def _spawn(rank: int, size: int, port: int, model: str, device: torch.device, dtype: torch.dtype, config: EngineConfig):
    argv = [
        sys.executable, "-m", "stageserve.engine.parallel.rank_worker",
        "--rank", str(rank), "--size", str(size), "--store-port", str(port), "--model", model,
        "--device", str(device), "--dtype", DTYPE_NAMES[dtype], "--engine-config", json.dumps(dataclasses.asdict(config)),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def leader_rank(config: EngineConfig, device: torch.device):
    """Rank 0's `TPRank` for loading its shard (None without tensor parallelism), after checking that
    there are enough devices, so a bad size fails before any weight is read."""
    from stageserve.engine.parallel.sharding import TPRank

    if config.tensor_parallel_size == 1:
        return None
    rank_devices(device, config.tensor_parallel_size)
    return TPRank(0, config.tensor_parallel_size)
