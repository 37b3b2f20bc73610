"""What the two GPU-bound stages (prefill and decode) share: config fields, engine start-up, stats."""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
from dataclasses import dataclass, field

import torch

from stageserve.common.errors import InvalidArgumentError
from stageserve.common.server import ServerConfig, ServerHandle
from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.engine.factory import create_engine
from stageserve.engine.worker import EngineWorker
from stageserve.transport.base import KVLayout
from stageserve.v1 import common_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Fields every engine-backed stage has."""

    model: str | None = field(
        default=None, metadata={"help": "default (SmolLM2-135M-Instruct), dummy:<shape>, a .gguf file or an HF dir"}
    )
    engine: EngineConfig = field(default_factory=EngineConfig)
    step_timeout_s: float = field(default=30.0, metadata={"help": "a step slower than this marks the worker unhealthy", "min": 0.1})
    trace_steps: bool = field(
        default=False,
        metadata={"help": "verbose tracing: a span per engine step, linked to its requests' spans, with remote sample calls under it"},
    )
    watchdog_interval_s: float = field(
        default=0.5, metadata={"help": "how often readiness is re-checked against the engine loop's health", "min": 0.01}
    )
    server: ServerConfig = field(default_factory=ServerConfig)


def kv_layout(engine: LLMEngine) -> KVLayout:
    m, c = engine.model_config, engine.config
    if engine.runner.kv_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidArgumentError("engine.kv_cache_dtype", "the KV transport does not carry fp8 pages yet")
    return KVLayout(m.num_layers, c.block_size, m.num_kv_heads, m.head_dim, engine.runner.kv_dtype)


def pool_stats_pb(engine: LLMEngine) -> common_pb2.KVPoolStats:
    stats = engine.stats()
    return common_pb2.KVPoolStats(
        total_blocks=stats.kv.num_blocks,
        free_blocks=stats.kv.num_free_blocks,
        reserved_blocks=stats.num_reserved_blocks + stats.num_held_blocks,
        cached_blocks=stats.kv.num_cached_blocks,
        block_size=engine.config.block_size,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
    )


async def keep_ready(handle: ServerHandle, worker: EngineWorker, config: WorkerConfig) -> None:
    """Ready while the engine can serve: its thread is alive, steps do not keep failing, and no step has
    run past step_timeout_s (the watchdog). A wedged worker turns NOT_SERVING and the gateway stops
    routing to it; it turns SERVING again if the step ends."""
    await handle.keep_ready(lambda: worker.healthy, config.watchdog_interval_s)


def freeze_heap() -> None:
    """Collect, then move every object still alive out of the garbage collector's reach (`gc.freeze`)."""
    gc.collect()
    gc.freeze()
    # Thawed at exit, so that the final collection frees it: else nanobind (triton's bindings) reports
    # every object it could not free, at length, on stderr.
    atexit.register(gc.unfreeze)


async def start_worker(config: WorkerConfig, engine: LLMEngine | None = None, local_draft: bool = True) -> EngineWorker:
    """Load the model (off the event loop), warm it up, freeze the start-up heap, and start the engine thread.

    `local_draft`: build the in-process draft that the engine's `speculative` knob asks for (a stage
    that talks to the Draft service says no, and sets its own).
    """
    if engine is None:
        engine = await asyncio.to_thread(create_engine, config.model, config.engine, local_draft)
    await asyncio.to_thread(engine.warmup)
    # The heap so far (weights, modules, captured graphs) lives as long as the process: freeze it, as vLLM
    # does after start-up, so that gen-2 collections skip it and their pauses stay out of inter-token
    # latency. Done here, in the stage's start-up, not in LLMEngine.warmup: freezing is process-wide, the
    # choice of whoever owns the process, not of a library that embeds the engine.
    freeze_heap()
    worker = EngineWorker(engine, step_timeout_s=config.step_timeout_s, trace_steps=config.trace_steps)
    worker.start()
    logger.info("engine ready: %s on %s/%s, %d KV blocks", engine.model_config.name, engine.device, engine.dtype, engine.config.num_blocks)
    return worker
