"""The Prefill service: compute a prompt's KV, push it into a decode worker's reserved blocks, and
return the first token.

Life of a Prefill call:
    1. validate the prompt, params and the decode target's descriptor against our own KV layout
    2. run the prompt as a prefill-only request (chunked, batched with other prompts, prefix-cached);
       it finishes after sampling the first token and its blocks stay HELD
    3. send the pages with the KV transport: by default all layers once the prompt is done (unless the
       first token already ends the request), or with `kv_layer_push` layer by layer while the prompt's
       last step computes. The response does not wait for the transfer (`first_token_before_kv`): it is off
       the TTFT path and decode's Attach waits for it
    4. release the held blocks on every exit path: success, transfer failure, cancel, deadline (the
       lease states of transport/lifecycle.py: HELD -> SENDING -> SENT, or ABORTED)

The transport is the descriptor's (decode chose it); one this worker cannot use for that peer (cuda-ipc
on another host) falls back to host, which every decode worker accepts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import grpc

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
from stageserve.transport.base import KVDescriptor, KVSender, KVSource, LayerFeed, TransportUnusable
from stageserve.transport.host import DEFAULT_MAX_CHUNK_BYTES, HostKVSender, channel_cache
from stageserve.transport.lifecycle import LeaseState, LeaseTable
from stageserve.transport.select import TransportChoice, host_id, served_transports
from stageserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillServiceConfig(WorkerConfig):
    kv_timeout_s: float = field(default=30.0, metadata={"help": "deadline of one KV transfer", "min": 0.1})
    kv_chunk_bytes: int = field(default=DEFAULT_MAX_CHUNK_BYTES, metadata={"help": "host transport chunk size", "min": 4096})
    kv_checksum: bool = field(default=True, metadata={"help": "CRC-32 every KV chunk"})
    first_token_before_kv: bool = field(
        default=True, metadata={"help": "return the first token before the KV transfer ends (lower TTFT)"}
    )
    kv_transport: TransportChoice = field(
        default="auto", metadata={"help": "KV transports this worker can send over: auto (by device) or one"}
    )
    kv_layer_push: bool = field(
        # Off by default: on one H200 the per-layer copies slowed the 2k-token prefill they overlap by more
        # than they saved (BENCHMARKS.md, issue 5); across GPUs, where copies don't share SMs, measure again.
        default=False, metadata={"help": "send each layer's pages as soon as they are ready (vs all layers, then send)"}
    )
    kv_device_checksum: bool = field(
        default=False, metadata={"help": "checksum the pages on the device; decode rejects a mismatch (re-prefill)"}
    )
    kv_claim_s: float = field(
        default=5.0, metadata={"help": "cuda-ipc: longest our copies into decode's pool may take", "min": 0.01}
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
        self, worker: EngineWorker, senders: dict[str, KVSender], kv_timeout_s: float, background: bool = True,
        metrics: Metrics | None = None, device_checksum: bool = False, layer_push: bool = False,
        channels=None,
    ):
        self.worker, self.senders, self.kv_timeout_s = worker, senders, kv_timeout_s
        self.channels = channels or channel_cache()  # address -> channel, shared with the senders
        self.metrics = metrics or Metrics()
        self.background = background
        self.transfers: dict[str, asyncio.Task] = {}  # request id -> KV push still under way
        self.leases = LeaseTable()
        self.fallbacks: set[str] = set()  # decode addresses we had to send over host instead
        self.engine = worker.engine
        self.layout = kv_layout(self.engine)
        self.source = KVSource(self._read_layer, self.engine.runner.kv_pool, device_checksum)
        self.layer_push = layer_push

    async def Prefill(self, request, context):
        req = PrefillInput.from_pb(request, self.engine.model_config.vocab_size)
        self._check_descriptor(req)
        previous = self.transfers.get(req.request_id)
        if previous is not None:  # prefilled again (decode rejected the pages): the old lease ends first
            await asyncio.wait([previous], timeout=self.kv_timeout_s)
        start = time.monotonic()
        # Layer-by-layer push: the transfer starts now and moves each layer as soon as the step that
        # completes the prompt has queued it, overlapping the remaining layers' compute.
        feed = LayerFeed(self.engine.device) if self.layer_push and req.descriptor is not None else None
        computed = asyncio.Event()  # the prompt's step is over: its blocks are held (or were freed)
        task = self._start_transfer(req, feed, computed) if feed is not None else None

        def add(engine):
            engine.add_request(req.request_id, req.prompt_token_ids, req.params, req.cache_salt, prefill_only=True)
            if feed is not None:
                engine.watch_layers(req.request_id, feed.on_layer)

        out = None
        attributes = {"stageserve.request_id": req.request_id, "stageserve.prefill.num_prompt_tokens": len(req.prompt_token_ids)}
        try:
            with tracing.span("prefill.compute", attributes) as s:
                async for batch in self.worker.stream(req.request_id, add):
                    out = batch[-1]
                s.set_attribute("stageserve.prefill.num_cached_tokens", out.num_cached_tokens)
                s.set_attribute("stageserve.prefill.num_computed_tokens", len(req.prompt_token_ids) - out.num_cached_tokens)
        except BaseException:
            if task is not None:
                task.cancel()
            raise
        finally:
            computed.set()
        self.metrics.prefill_time.observe(time.monotonic() - start)
        self.metrics.prefix_cache_queries.inc(len(req.prompt_token_ids))
        self.metrics.prefix_cache_hits.inc(out.num_cached_tokens)
        transfer_s = 0.0
        if task is None and out.finish_reason is None and req.descriptor is not None:
            task = self._start_transfer(req, None, computed)
        if task is None:
            await self.worker.call(lambda e: e.release_held(req.request_id))
        elif not self.background:  # the transfer's tail (all of it without layer push) is on this response's path
            transfer_start = time.monotonic()
            await task
            transfer_s = time.monotonic() - transfer_start
        token = first_token(out)
        logger.debug("%s: prefill %d tokens in %.1f ms", req.request_id, len(req.prompt_token_ids), (time.monotonic() - start) * 1e3)
        return prefill_pb2.PrefillResponse(
            first_token=sampled_token_to_pb(token),
            num_cached_tokens=out.num_cached_tokens,
            num_computed_tokens=len(req.prompt_token_ids) - out.num_cached_tokens,
            finish_reason=finish_reason_to_pb(out.finish_reason),
            kv_transfer_s=transfer_s,
        )

    def _start_transfer(self, req: PrefillInput, feed: LayerFeed | None, computed: asyncio.Event) -> asyncio.Task:
        task = asyncio.create_task(self._transfer(req, feed, computed))
        self.transfers[req.request_id] = task
        task.add_done_callback(lambda t: self.transfers.pop(req.request_id, None) if self.transfers.get(req.request_id) is t else None)
        return task

    def _check_descriptor(self, req: PrefillInput) -> None:
        d = req.descriptor
        if d is None:
            return
        if d.layout != self.layout:
            raise InvalidArgumentError("decode_target.kv.layout", f"{d.layout} does not match this worker's {self.layout}")
        needed = -(-len(req.prompt_token_ids) // self.layout.block_size)
        if len(d.block_ids) != needed:
            raise InvalidArgumentError("decode_target.kv.block_ids", f"{len(d.block_ids)} blocks for a prompt needing {needed}")

    def _sender(self, d: KVDescriptor) -> KVSender:
        """The descriptor's transport, or host where we cannot use it for this peer (every decode accepts host)."""
        sender = self.senders.get(d.transport)
        same_host = d.cuda_ipc is None or d.cuda_ipc.host_id == host_id()
        if sender is not None and (d.transport != "cuda-ipc" or same_host):
            return sender
        if d.address not in self.fallbacks:  # once per decode worker: the gateway normally prevents this
            self.fallbacks.add(d.address)
            logger.warning("kv transport %s unusable for decode at %s (%s); sending over host", d.transport, d.address,
                           "another host" if not same_host else "not served here")
        return self.senders["host"]

    async def _transfer(self, req: PrefillInput, feed: LayerFeed | None, computed: asyncio.Event) -> None:
        """Push the prompt's pages into the decode worker's reservation (as its layers are computed, with
        a feed), then release them, whatever happens, once the prompt's step is over.

        A failure is only logged here (unless the response waits for the transfer): decode's reservation
        then never completes or is marked failed, so its Attach fails and the gateway sees the error there.
        """
        lease, state, reason = None, LeaseState.ABORTED, "cancelled"
        try:
            src = await feed.block_ids() if feed is not None else await self.worker.call(lambda e: e.held_block_ids(req.request_id))
            lease = self.leases.open(req.request_id, len(src))
            descriptor = req.descriptor if req.descriptor.address else dataclasses.replace(req.descriptor, address=req.target_address)
            sender = self._sender(descriptor)
            self.leases.sending(lease)
            source = dataclasses.replace(self.source, feed=feed)
            with tracing.span("kv_transfer", {"stageserve.request_id": req.request_id}, kind="client") as s:
                try:
                    stats = await sender.send(descriptor, src, source, self.kv_timeout_s)
                except TransportUnusable as exc:  # nothing was written: every decode worker also takes host
                    logger.warning("%s: %s; sending over host instead", req.request_id, exc)
                    stats = await self.senders["host"].send(descriptor, src, source, self.kv_timeout_s)
                s.set_attributes({
                    "stageserve.kv.transport": stats.transport, "stageserve.kv.bytes": stats.num_bytes,
                    "stageserve.kv.blocks": stats.num_blocks, "stageserve.kv.layers": stats.num_layers,
                    "stageserve.kv.chunks": stats.num_chunks, "stageserve.kv.duration_s": stats.seconds,
                    "stageserve.kv.checksum": stats.checksum,
                })  # fmt: skip
            self.metrics.kv_transfer_time.observe(stats.seconds)
            self.metrics.kv_transfer_bytes.observe(stats.num_bytes)
            logger.debug("%s: %d KV bytes in %d chunks, %.1f ms", req.request_id, stats.num_bytes, stats.num_chunks, stats.seconds * 1e3)
            state, reason = LeaseState.SENT, None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # grpc errors, timeouts: tell decode, whose Attach then fails at once
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning("%s: KV transfer to %s failed: %s", req.request_id, req.target_address, exc)
            if lease is not None:
                await asyncio.shield(self._abort_at_decode(req, reason))
            if not self.background:
                raise
        finally:
            if lease is not None:
                self.leases.close(lease, state, reason)
            await asyncio.shield(self._release_after(req.request_id, computed))

    async def _abort_at_decode(self, req: PrefillInput, reason: str) -> None:
        """Best effort, bounded: a decode worker that is gone frees the reservation by its TTL instead."""
        stub = decode_pb2_grpc.DecodeStub(self.channels(req.target_address))
        try:
            pb = decode_pb2.AbortKVRequest(reservation_id=req.descriptor.reservation_id, reason=reason[:500])
            await stub.AbortKV(pb, timeout=1.0, metadata=tracing.outgoing_metadata())
        except grpc.aio.AioRpcError as exc:
            logger.info("%s: could not tell decode the transfer failed: %s", req.request_id, exc.code().name)

    async def _release_after(self, request_id: str, computed: asyncio.Event) -> None:
        await computed.wait()  # until then the blocks belong to the running prompt, not to us
        await self.worker.call(lambda e: e.release_held(request_id))

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
        pool = await self.worker.call(pool_stats_pb)
        pool.active_leases, pool.transfer_blocks = len(self.leases), self.leases.num_blocks
        return prefill_pb2.PrefillStatsResponse(pool=pool, host_id=host_id(), kv_transports=list(self.senders))


def make_senders(config: PrefillServiceConfig, device, channels) -> dict[str, KVSender]:
    senders: dict[str, KVSender] = {}
    for name in served_transports(config.kv_transport, device, config.engine.tensor_parallel_size):
        if name == "cuda-ipc":
            from stageserve.transport.cuda_ipc import CudaIpcKVSender

            senders[name] = CudaIpcKVSender(channels, device, config.kv_layer_push, config.kv_claim_s)
        elif name == "nccl":
            from stageserve.transport.nccl import NcclKVSender

            try:
                senders[name] = NcclKVSender(channels, device)
            except (RuntimeError, OSError) as exc:  # libnccl found but not loadable
                if config.kv_transport != "auto":
                    raise InvalidArgumentError("kv_transport", f"nccl cannot start on this machine: {exc}") from exc
                logger.warning("kv transport nccl unavailable here (%s)", exc)
        else:
            senders[name] = HostKVSender(channels, config.kv_chunk_bytes, config.kv_checksum, config.kv_layer_push)
    return senders


async def start(config: PrefillServiceConfig, worker: EngineWorker | None = None) -> tuple[ServerHandle, EngineWorker]:
    worker = worker or await start_worker(config)
    channels = channel_cache(config.server.security)
    senders = make_senders(config, worker.engine.device, channels)
    metrics = Metrics()
    metrics.watch_engine(worker.engine.stats)
    metrics.watch_gpu()
    servicer = PrefillServicer(worker, senders, config.kv_timeout_s, config.first_token_before_kv, metrics,
                               config.kv_device_checksum, config.kv_layer_push, channels)
    handle = await create_server(config.server, [servicer], metrics=metrics)
    await keep_ready(handle, worker, config)
    logger.info("prefill serving on %s (kv transports %s)", handle.address, ", ".join(senders))
    return handle, worker


async def serve(config: PrefillServiceConfig) -> None:
    handle, worker = await start(config)
    await serve_until_stopped(handle, worker.stop)
