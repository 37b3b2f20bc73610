"""The Decode service: reserve blocks, receive a prompt's KV, then decode it in the running batch.

Life of a sequence here:
    Reserve    -> blocks allocated, a Reservation with a deadline (RESERVED)
    PushKV     -> every chunk validated against the reservation and our pool, then written
    Attach     -> waits (bounded) until the KV is complete, then the sequence joins the continuous batch
                  and tokens stream back; a failed transfer fails the Attach at once
    Cancel, a client that goes away, or a reservation past its deadline -> blocks freed at once
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field

from stageserve.common.convert import (
    check_token_ids,
    finish_reason_to_pb,
    sampled_token_from_pb,
    sampled_token_to_pb,
    sampling_params_from_pb,
)
from stageserve.common import tracing
from stageserve.common.metrics import Metrics
from stageserve.common.engine_stage import WorkerConfig, kv_layout, pool_stats_pb, start_worker
from stageserve.common.errors import DeadlineExceededError, InvalidArgumentError, NotFoundError
from stageserve.common.server import ServerHandle, create_server, serve_until_stopped
from stageserve.engine.engine import RequestOutput
from stageserve.engine.worker import EngineWorker
from stageserve.sample.sampler import SampledToken
from stageserve.transport.base import KVDescriptor, Reservation
from stageserve.transport.host import validate_chunk
from stageserve.v1 import decode_pb2, decode_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeServiceConfig(WorkerConfig):
    reservation_ttl_s: float = field(default=30.0, metadata={"help": "unattached reservations are freed after this", "min": 0.1})
    kv_wait_timeout_s: float = field(
        default=30.0, metadata={"help": "how long Attach waits for a reservation's KV to finish arriving", "min": 0.01}
    )
    sample_address: str | None = field(default=None, metadata={"help": "HOST:PORT of a Sample service (--sampler remote)"})
    advertise_address: str | None = field(
        default=None, metadata={"help": "address prefill workers push KV to (default: the bound host:port)"}
    )
    draft_address: str | None = field(
        default=None,
        metadata={"help": "HOST:PORT[,HOST:PORT...] of Draft service replicas, used when --engine-speculative is "
                  "not none (without it, the draft runs in-process)"},
    )  # fmt: skip
    draft_timeout_s: float = field(
        default=0.5, metadata={"help": "a draft call slower than this is dropped: that step decodes without "
                               "speculation, and the replica is skipped until it is healthy again", "min": 0.001}
    )  # fmt: skip
    draft_retry_s: float = field(
        default=2.0, metadata={"help": "first wait before a failed draft replica is checked again (doubles)", "min": 0.01}
    )


def tokens_pb(outputs: list[RequestOutput]) -> list:
    return [
        sampled_token_to_pb(SampledToken(tid, lp, tuple(top) if top else ()))
        for out in outputs
        for tid, lp, top in zip(out.new_token_ids, out.new_logprobs, out.new_top_logprobs or [None] * len(out.new_token_ids))
    ]


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(
        self, worker: EngineWorker, reservation_ttl_s: float, kv_wait_timeout_s: float = 30.0,
        metrics: Metrics | None = None,
    ):
        self.worker, self.engine = worker, worker.engine
        self.metrics = metrics or Metrics()
        self.kv_wait_timeout_s = kv_wait_timeout_s
        self.layout = kv_layout(self.engine)
        self.ttl_s = reservation_ttl_s
        self.address = ""  # set once the server is bound
        self.reservations: dict[str, Reservation] = {}
        self.by_request: dict[str, str] = {}
        self.reaper: asyncio.Task | None = None

    async def Reserve(self, request, context):
        if not request.request_id:
            raise InvalidArgumentError("request_id", "must not be empty")
        if request.num_tokens < 1:
            raise InvalidArgumentError("num_tokens", "must be >= 1")
        if request.transports and "host" not in request.transports:
            raise InvalidArgumentError("transports", f"none of {list(request.transports)} is served here (host)")
        params = sampling_params_from_pb(request.sampling_params)
        block_ids = await self.worker.call(lambda e: e.reserve(request.request_id, request.num_tokens, params))
        reservation = Reservation(
            uuid.uuid4().hex, request.request_id, tuple(block_ids), self.layout, time.monotonic() + self.ttl_s
        )
        self.reservations[reservation.reservation_id] = reservation
        self.by_request[request.request_id] = reservation.reservation_id
        descriptor = KVDescriptor("host", reservation.reservation_id, reservation.block_ids, self.layout,
                                  int(self.ttl_s * 1000), self.address)
        return decode_pb2.ReserveResponse(descriptor=descriptor.to_pb())

    async def PushKV(self, request_iterator, context):
        reservation, num_chunks, num_bytes = None, 0, 0
        async for chunk in request_iterator:
            reservation = reservation or self._reservation(chunk.reservation_id, "kv_chunk.reservation_id")
            if chunk.reservation_id != reservation.reservation_id:
                raise InvalidArgumentError("kv_chunk.reservation_id", "changed within one stream")
            try:
                pages = validate_chunk(chunk, reservation, self.layout)
            except InvalidArgumentError as exc:
                reservation.fail(str(exc))  # fail closed: nothing of this transfer will be decoded
                raise
            # Reserved blocks belong to no running sequence, so writing them off the engine thread is safe.
            self.engine.runner.write_kv(chunk.layer_index, list(chunk.block_ids), pages)
            reservation.record(chunk.layer_index, list(chunk.block_ids))
            reservation.next_chunk += 1
            num_chunks, num_bytes = num_chunks + 1, num_bytes + len(chunk.data)
            if chunk.final and not reservation.complete:
                reservation.fail("transfer ended before every layer of every block arrived")
                raise InvalidArgumentError("kv_chunk.final", reservation.error)
            if reservation.complete:
                reservation.land()
        rid = reservation.reservation_id if reservation else ""
        return decode_pb2.PushKVResponse(reservation_id=rid, num_chunks=num_chunks, num_bytes=num_bytes)

    async def Attach(self, request, context):
        """One span per sequence (the server span the tracing interceptor opens), with its events."""
        span, start = tracing.current_span(), time.monotonic()
        span.set_attribute("stageserve.request_id", request.request_id)
        reservation = self._reservation(request.reservation_id, "reservation_id")
        if reservation.request_id != request.request_id:
            raise InvalidArgumentError("request_id", "does not own this reservation")
        if not reservation.complete:  # the prefill worker may still be pushing: wait, but not forever
            try:
                await asyncio.wait_for(reservation.settled.wait(), self.kv_wait_timeout_s)
            except TimeoutError:
                raise DeadlineExceededError(f"reservation_id: KV did not arrive within {self.kv_wait_timeout_s} s") from None
            if not reservation.complete:
                raise InvalidArgumentError("reservation_id", f"KV transfer failed: {reservation.error}")
        span.add_event("kv_ready")
        check_token_ids(request.prompt_token_ids, self.engine.model_config.vocab_size, "prompt_token_ids")
        first = sampled_token_from_pb(request.first_token)
        prompt, cached = list(request.prompt_token_ids), request.num_cached_tokens
        self._forget(reservation)
        def attach(engine):
            out = engine.attach(request.request_id, prompt, first, cached)
            # The gateway already sent the first token; if it alone ended the request, send only the end.
            return dataclasses.replace(out, new_token_ids=[], new_logprobs=[], new_top_logprobs=[]) if out else None

        count = 1  # the first token, sampled by prefill
        async for batch in self.worker.stream(request.request_id, attach):
            finished = batch[-1].finished
            tokens = tokens_pb(batch)
            if count == 1 and tokens:
                span.add_event("first_token")
            count += len(tokens)
            if finished:
                span.add_event("finish", {"stageserve.num_output_tokens": count})
                span.set_attribute("gen_ai.usage.output_tokens", count)
                self.metrics.decode_time.observe(time.monotonic() - start)
            yield decode_pb2.TokenEvent(
                tokens=tokens, num_output_tokens=count,
                finish_reason=finish_reason_to_pb(batch[-1].finish_reason if finished else None),
            )

    async def Cancel(self, request, context):
        reservation_id = self.by_request.get(request.request_id)
        if reservation_id is not None:
            self._forget(self.reservations[reservation_id])
        return decode_pb2.DecodeCancelResponse(found=await self.worker.abort_quietly(request.request_id))

    async def Stats(self, request, context):
        return decode_pb2.DecodeStatsResponse(pool=await self.worker.call(pool_stats_pb))

    def _reservation(self, reservation_id: str, field_name: str) -> Reservation:
        reservation = self.reservations.get(reservation_id)
        if reservation is None:
            raise NotFoundError(f"{field_name}: no reservation {reservation_id!r}")
        return reservation

    def _forget(self, reservation: Reservation) -> None:
        self.reservations.pop(reservation.reservation_id, None)
        self.by_request.pop(reservation.request_id, None)

    async def reap_expired(self, interval_s: float = 1.0) -> None:
        """Free reservations whose KV never arrived or whose owner never attached."""
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            for reservation in [r for r in self.reservations.values() if r.expired(now)]:
                logger.warning("reservation for %s expired; freeing its blocks", reservation.request_id)
                self._forget(reservation)
                await self.worker.abort_quietly(reservation.request_id)


async def start(config: DecodeServiceConfig, worker: EngineWorker | None = None) -> tuple[ServerHandle, EngineWorker]:
    worker = worker or await start_worker(config, local_draft=not config.draft_address)
    if config.draft_address and worker.engine.config.speculative != "none":
        from stageserve.draft.client import RemoteDraft

        draft = RemoteDraft(config.draft_address.split(","), config.draft_timeout_s, config.draft_retry_s)
        await worker.call(lambda engine: engine.set_draft(draft))
    if config.sample_address:
        from stageserve.sample.remote import RemoteSampler

        worker.engine.runner.sampler = RemoteSampler(config.sample_address)
    metrics = Metrics()
    metrics.watch_engine(worker.engine.stats)
    metrics.watch_speculation(lambda: worker.engine.speculator.counters if worker.engine.speculator else None)
    metrics.watch_gpu()
    servicer = DecodeServicer(worker, config.reservation_ttl_s, config.kv_wait_timeout_s, metrics)
    handle = await create_server(config.server, [servicer], metrics=metrics)
    servicer.address = config.advertise_address or handle.address
    servicer.reaper = asyncio.create_task(servicer.reap_expired())
    await handle.set_ready(True)
    logger.info("decode serving on %s (sampler %s)", handle.address, config.sample_address or "in-process")
    return handle, worker


async def serve(config: DecodeServiceConfig) -> None:
    handle, worker = await start(config)
    await serve_until_stopped(handle, worker.stop)
