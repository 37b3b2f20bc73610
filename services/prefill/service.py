"""The Prefill service: compute a prompt's KV, push it into a decode worker's reserved blocks, and
return the first token.

Life of a Prefill call:
    1. validate the prompt, params and the decode target's descriptor against our own KV layout
    2. run the prompt as a prefill-only request (chunked, batched with other prompts, prefix-cached);
       it finishes after sampling the first token and its blocks stay HELD
    3. unless the first token already ends the request, send the held pages with the KV transport:
       by default in the background after the first token is returned (`first_token_before_kv`), so the
       transfer is off the TTFT path and decode's Attach waits for it; or before returning
    4. release the held blocks on every exit path: success, transfer failure, cancel, deadline
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field


from stageserve.common.convert import (
    check_token_ids,
    finish_reason_to_pb,
    sampled_token_to_pb,
    sampling_params_from_pb,
)
from stageserve.common import tracing
from stageserve.common.metrics import Metrics
from stageserve.common.engine_stage import WorkerConfig, keep_ready, kv_layout, pool_stats_pb, start_worker
from stageserve.common.errors import InvalidArgumentError
from stageserve.common.server import ServerHandle, create_server, serve_until_stopped
from stageserve.engine.worker import EngineWorker
from stageserve.engine.engine import RequestOutput
from stageserve.sample.params import SamplingParams
from stageserve.sample.sampler import SampledToken
from stageserve.transport.base import KVDescriptor, KVSender
from stageserve.transport.host import DEFAULT_MAX_CHUNK_BYTES, HostKVSender, channel_cache
from stageserve.v1 import prefill_pb2, prefill_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillServiceConfig(WorkerConfig):
    kv_timeout_s: float = field(default=30.0, metadata={"help": "deadline of one KV transfer", "min": 0.1})
    kv_chunk_bytes: int = field(default=DEFAULT_MAX_CHUNK_BYTES, metadata={"help": "host transport chunk size", "min": 4096})
    kv_checksum: bool = field(default=True, metadata={"help": "CRC-32 every KV chunk"})
    first_token_before_kv: bool = field(
        default=True, metadata={"help": "return the first token before the KV transfer ends (lower TTFT)"}
    )


@dataclass(frozen=True)
class PrefillInput:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    target_address: str
    descriptor: KVDescriptor | None

    @classmethod
    def from_pb(cls, pb: prefill_pb2.PrefillRequest, vocab_size: int) -> PrefillInput:
        if not pb.request_id:
            raise InvalidArgumentError("request_id", "must not be empty")
        if not pb.prompt_token_ids:
            raise InvalidArgumentError("prompt_token_ids", "must not be empty")
        check_token_ids(pb.prompt_token_ids, vocab_size, "prompt_token_ids")
        params = sampling_params_from_pb(pb.sampling_params)
        target = pb.decode_target if pb.HasField("decode_target") else None
        descriptor = KVDescriptor.from_pb(target.kv) if target is not None else None
        if target is not None and not target.address:
            raise InvalidArgumentError("decode_target.address", "must not be empty")
        return cls(
            pb.request_id, list(pb.prompt_token_ids), params, pb.cache_salt or None,
            target.address if target else "", descriptor,
        )


def first_token(out: RequestOutput) -> SampledToken:
    top = tuple(out.new_top_logprobs[0]) if out.new_top_logprobs else ()
    return SampledToken(out.new_token_ids[0], out.new_logprobs[0], top)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(
        self, worker: EngineWorker, sender: KVSender, kv_timeout_s: float, background: bool = True,
        metrics: Metrics | None = None,
    ):
        self.worker, self.sender, self.kv_timeout_s = worker, sender, kv_timeout_s
        self.metrics = metrics or Metrics()
        self.background = background
        self.transfers: dict[str, asyncio.Task] = {}  # request id -> KV push still under way
        self.engine = worker.engine
        self.layout = kv_layout(self.engine)

    async def Prefill(self, request, context):
        req = PrefillInput.from_pb(request, self.engine.model_config.vocab_size)
        self._check_descriptor(req)
        start = time.monotonic()
        out = None
        add = lambda e: e.add_request(req.request_id, req.prompt_token_ids, req.params, req.cache_salt, prefill_only=True)
        attributes = {"stageserve.request_id": req.request_id, "stageserve.prefill.num_prompt_tokens": len(req.prompt_token_ids)}
        with tracing.span("prefill.compute", attributes) as s:
            async for batch in self.worker.stream(req.request_id, add):
                out = batch[-1]
            s.set_attribute("stageserve.prefill.num_cached_tokens", out.num_cached_tokens)
            s.set_attribute("stageserve.prefill.num_computed_tokens", len(req.prompt_token_ids) - out.num_cached_tokens)
        self.metrics.prefill_time.observe(time.monotonic() - start)
        self.metrics.prefix_cache_queries.inc(len(req.prompt_token_ids))
        self.metrics.prefix_cache_hits.inc(out.num_cached_tokens)
        if out.finish_reason is None and req.descriptor is not None:
            transfer = self._transfer(req)
            if self.background:
                self.transfers[req.request_id] = asyncio.create_task(transfer)
            else:
                await transfer
        else:
            await self.worker.call(lambda e: e.release_held(req.request_id))
        token = first_token(out)
        logger.debug("%s: prefill %d tokens in %.1f ms", req.request_id, len(req.prompt_token_ids), (time.monotonic() - start) * 1e3)
        return prefill_pb2.PrefillResponse(
            first_token=sampled_token_to_pb(token),
            num_cached_tokens=out.num_cached_tokens,
            num_computed_tokens=len(req.prompt_token_ids) - out.num_cached_tokens,
            finish_reason=finish_reason_to_pb(out.finish_reason),
        )

    def _check_descriptor(self, req: PrefillInput) -> None:
        d = req.descriptor
        if d is None:
            return
        if d.layout != self.layout:
            raise InvalidArgumentError("decode_target.kv.layout", f"{d.layout} does not match this worker's {self.layout}")
        needed = -(-len(req.prompt_token_ids) // self.layout.block_size)
        if len(d.block_ids) != needed:
            raise InvalidArgumentError("decode_target.kv.block_ids", f"{len(d.block_ids)} blocks for a prompt needing {needed}")
        if d.transport != self.sender.name:
            raise InvalidArgumentError("decode_target.kv.transport", f"{d.transport!r} is not served here ({self.sender.name!r})")

    async def _transfer(self, req: PrefillInput) -> None:
        """Push the held pages into the decode worker's reservation, then release them whatever happens.

        A failure is only logged here: decode's reservation then never completes (or is marked failed),
        so its Attach fails and the gateway sees the error there.
        """
        try:
            src = await self.worker.call(lambda e: e.held_block_ids(req.request_id))
            with tracing.span("kv_transfer", {"stageserve.request_id": req.request_id}, kind="client") as s:
                stats = await self.sender.send(req.descriptor, src, self._read_layer, self.kv_timeout_s)
                s.set_attributes({
                    "stageserve.kv.transport": stats.transport, "stageserve.kv.bytes": stats.num_bytes,
                    "stageserve.kv.blocks": stats.num_blocks, "stageserve.kv.layers": stats.num_layers,
                    "stageserve.kv.chunks": stats.num_chunks, "stageserve.kv.duration_s": stats.seconds,
                    "stageserve.kv.checksum": stats.checksum,
                })  # fmt: skip
            self.metrics.kv_transfer_time.observe(stats.seconds)
            self.metrics.kv_transfer_bytes.observe(stats.num_bytes)
            logger.debug("%s: %d KV bytes in %d chunks, %.1f ms", req.request_id, stats.num_bytes, stats.num_chunks, stats.seconds * 1e3)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # grpc errors, timeouts: the request fails at decode's Attach
            logger.warning("%s: KV transfer to %s failed: %s", req.request_id, req.target_address, exc)
            if not self.background:
                raise
        finally:
            self.transfers.pop(req.request_id, None)
            await self.worker.call(lambda e: e.release_held(req.request_id))

    async def _read_layer(self, layer: int, block_ids: list[int]):
        # Held blocks are written by nobody until released, so they can be read off the engine thread.
        return await asyncio.to_thread(self.engine.runner.read_kv, layer, block_ids)

    async def Cancel(self, request, context):
        transfer = self.transfers.pop(request.request_id, None)
        if transfer is not None:
            transfer.cancel()  # its `finally` releases the held blocks
        found = await self.worker.abort_quietly(request.request_id)
        return prefill_pb2.PrefillCancelResponse(found=found or transfer is not None)

    async def Stats(self, request, context):
        return prefill_pb2.PrefillStatsResponse(pool=await self.worker.call(pool_stats_pb))


async def start(config: PrefillServiceConfig, worker: EngineWorker | None = None) -> tuple[ServerHandle, EngineWorker]:
    worker = worker or await start_worker(config)
    sender = HostKVSender(channel_cache(config.server.security), max_chunk_bytes=config.kv_chunk_bytes, checksum=config.kv_checksum)
    metrics = Metrics()
    metrics.watch_engine(worker.engine.stats)
    metrics.watch_gpu()
    servicer = PrefillServicer(worker, sender, config.kv_timeout_s, config.first_token_before_kv, metrics)
    handle = await create_server(config.server, [servicer], metrics=metrics)
    await keep_ready(handle, worker, config)
    logger.info("prefill serving on %s", handle.address)
    return handle, worker


async def serve(config: PrefillServiceConfig) -> None:
    handle, worker = await start(config)
    await serve_until_stopped(handle, worker.stop)
