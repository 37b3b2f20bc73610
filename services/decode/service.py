"""The Decode service: reserve blocks, receive a prompt's KV, then decode it in the running batch.

Life of a sequence here (the states are transport/lifecycle.py's):
    Reserve    -> blocks allocated, a Reservation with a deadline (RESERVED), over the transport chosen
                  for this peer (transport/select.py)
    PushKV     -> every chunk validated against the reservation and our pool, then landed (RECEIVING;
                  LANDED once every layer of every block is in)
    WriteKV    -> cuda-ipc: the same, for a writer that copies into our pool itself: claim, then notices
                  (or an abort) on one stream
    Attach     -> waits (bounded) until LANDED, then the sequence joins the continuous batch (ATTACHED)
                  and tokens stream back; a failed transfer fails the Attach at once with its reason
    Cancel (RELEASED), a corrupt or cut-short transfer or a sender that died mid-stream (ABORTED), or a
    reservation past its deadline (EXPIRED) -> blocks freed at once
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
from stageserve.common.engine_stage import WorkerConfig, keep_ready, kv_layout, pool_stats_pb, start_worker
from stageserve.common.errors import DataLossError, DeadlineExceededError, InvalidArgumentError, NotFoundError
from stageserve.common.server import ServerHandle, create_server, serve_until_stopped
from stageserve.engine.engine import RequestOutput
from stageserve.engine.worker import EngineWorker
from stageserve.sample.sampler import SampledToken
from stageserve.transport.base import KVDescriptor
from stageserve.transport.lifecycle import Reservation, ReservationTable, TransferState
from stageserve.transport.receive import KVLanding
from stageserve.transport.select import TransportChoice, choose_for_peer, served_transports
from stageserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

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
    kv_transport: TransportChoice = field(
        default="auto", metadata={"help": "KV transports served: auto (cuda-ipc, nccl, host on a GPU; host on CPU) or one"}
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
        metrics: Metrics | None = None, transports: tuple[str, ...] = ("host",), strict: bool = False,
    ):
        self.worker, self.engine = worker, worker.engine
        self.metrics = metrics or Metrics()
        self.kv_wait_timeout_s = kv_wait_timeout_s
        self.layout = kv_layout(self.engine)
        self.ttl_s = reservation_ttl_s
        self.address = ""  # set once the server is bound
        self.transports = transports
        self.table = ReservationTable(free=worker.abort_quietly)
        self.ipc_pool = None  # cuda_ipc.IpcPool, exported once when cuda-ipc is served
        self.nccl = None  # nccl.NcclEndpoint when nccl is served
        if "cuda-ipc" in transports:
            self.ipc_pool = self._set_up("cuda-ipc", strict, self._export_pool)
        if "nccl" in transports:
            from stageserve.transport.nccl import NcclEndpoint

            self.nccl = self._set_up("nccl", strict, lambda: NcclEndpoint(self.engine.device))
        self.landing = KVLanding(self.engine.runner, self.layout, self.nccl, kv_wait_timeout_s)
        self.reaper: asyncio.Task | None = None

    def _export_pool(self):
        from stageserve.transport.cuda_ipc import export_pool

        return export_pool(self.engine.runner.kv_pool).to_pb()

    def _set_up(self, name: str, strict: bool, make):
        """A GPU transport's one-time set-up. Failing, it is an error if asked for by name; under auto the
        worker serves the others and says why."""
        try:
            return make()
        except (RuntimeError, OSError, ValueError) as exc:
            if strict:
                raise InvalidArgumentError("kv_transport", f"{name} cannot start on this machine: {exc}") from exc
            logger.warning("kv transport %s unavailable here (%s); serving %s", name, exc,
                           ", ".join(t for t in self.transports if t != name))
            self.transports = tuple(t for t in self.transports if t != name)
            return None

    async def Reserve(self, request, context):
        if not request.request_id:
            raise InvalidArgumentError("request_id", "must not be empty")
        if request.num_tokens < 1:
            raise InvalidArgumentError("num_tokens", "must be >= 1")
        transport = choose_for_peer(self.transports, list(request.transports), request.peer_host_id)
        params = sampling_params_from_pb(request.sampling_params)
        block_ids = await self.worker.call(lambda e: e.reserve(request.request_id, request.num_tokens, params))
        reservation = Reservation(
            uuid.uuid4().hex, request.request_id, tuple(block_ids), self.layout, time.monotonic() + self.ttl_s,
            transport=transport, peer_id=request.peer_id,
        )
        self.table.add(reservation)
        descriptor = KVDescriptor(
            transport, reservation.reservation_id, reservation.block_ids, self.layout, int(self.ttl_s * 1000),
            self.address, cuda_ipc=self.ipc_pool if transport == "cuda-ipc" else None,
            nccl=common_pb2.NcclTransportParams(rank=1, peer_rank=0) if transport == "nccl" else None,
        )
        return decode_pb2.ReserveResponse(descriptor=descriptor.to_pb())

    async def PushKV(self, request_iterator, context):
        rid, num_chunks, num_bytes = await self.landing.receive(request_iterator, self.table)
        return decode_pb2.PushKVResponse(reservation_id=rid, num_chunks=num_chunks, num_bytes=num_bytes)

    async def ClaimKV(self, request, context):
        lease_s = max(request.lease_ms, 1) / 1000
        if request.lease_ms > self.ttl_s * 1000:
            raise InvalidArgumentError("lease_ms", f"longer than the reservation TTL ({self.ttl_s:g} s)")
        self.table.claim(request.reservation_id, lease_s, list(request.block_ids))
        return decode_pb2.ClaimKVResponse(reservation_id=request.reservation_id)

    async def WriteKV(self, request_iterator, context):
        async for ack in self.landing.receive_writes(request_iterator, self.table, self.ttl_s):
            yield ack

    async def AbortKV(self, request, context):
        try:
            reservation = self.table.get(request.reservation_id, "reservation_id")
        except (InvalidArgumentError, DataLossError, NotFoundError):  # already ended, or never existed
            return decode_pb2.AbortKVResponse(found=False)
        reason = f"the sender gave up: {request.reason[:500] or 'no reason given'}"
        found = await self.table.end(reservation, TransferState.ABORTED, reason)
        await self.table.writer_done(reservation)  # only the writer sends this, after its copies are over
        return decode_pb2.AbortKVResponse(found=found)

    async def ConnectKV(self, request, context):
        if self.nccl is None:
            raise InvalidArgumentError("comm_id", f"this worker serves no nccl transport ({', '.join(self.transports)})")
        timeout_s = max(request.timeout_ms, 1) / 1000
        await self.nccl.join(request.unique_id, request.comm_id, 1, timeout_s)
        return decode_pb2.ConnectKVResponse(comm_id=request.comm_id)

    async def Attach(self, request, context):
        """One span per sequence (the server span the tracing interceptor opens), with its events."""
        span, start = tracing.current_span(), time.monotonic()
        span.set_attribute("stageserve.request_id", request.request_id)
        reservation = self.table.get(request.reservation_id, "reservation_id")
        if reservation.request_id != request.request_id:
            raise InvalidArgumentError("request_id", "does not own this reservation")
        if reservation.state is not TransferState.LANDED:  # the prefill worker may still be pushing: wait, not forever
            try:
                await asyncio.wait_for(reservation.settled.wait(), self.kv_wait_timeout_s)
            except TimeoutError:
                raise DeadlineExceededError(f"reservation_id: KV did not arrive within {self.kv_wait_timeout_s} s") from None
            if reservation.state is not TransferState.LANDED:
                raise reservation.failure()
        span.add_event("kv_ready")
        check_token_ids(request.prompt_token_ids, self.engine.model_config.vocab_size, "prompt_token_ids")
        first = sampled_token_from_pb(request.first_token)
        prompt, cached = list(request.prompt_token_ids), request.num_cached_tokens
        await self.table.end(reservation, TransferState.ATTACHED)

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
        reservation = self.table.for_request(request.request_id)
        ended = reservation is not None and await self.table.end(reservation, TransferState.RELEASED)
        running = await self.worker.abort_quietly(request.request_id)
        return decode_pb2.DecodeCancelResponse(found=ended or running)

    async def Stats(self, request, context):
        pool = await self.worker.call(pool_stats_pb)
        pool.active_reservations, pool.transfer_blocks = len(self.table), self.table.num_blocks
        return decode_pb2.DecodeStatsResponse(pool=pool)

    async def reap_expired(self, interval_s: float = 1.0) -> None:
        """Free reservations whose KV never arrived or whose owner never attached."""
        while True:
            await asyncio.sleep(interval_s)
            await self.table.expire()


async def start(config: DecodeServiceConfig, worker: EngineWorker | None = None) -> tuple[ServerHandle, EngineWorker]:
    worker = worker or await start_worker(config, local_draft=not config.draft_address)
    if config.draft_address and worker.engine.config.speculative != "none":
        from stageserve.draft.client import RemoteDraft

        draft = RemoteDraft(config.draft_address.split(","), config.draft_timeout_s, config.draft_retry_s)
        await worker.call(lambda engine: engine.set_draft(draft))
    if config.sample_address:
        from stageserve.sample.remote import RemoteSampler

        worker.engine.runner.sampler = RemoteSampler(config.sample_address, security=config.server.security)
    metrics = Metrics()
    metrics.watch_engine(worker.engine.stats)
    metrics.watch_speculation(lambda: worker.engine.speculator.counters if worker.engine.speculator else None)
    metrics.watch_gpu()
    transports = served_transports(config.kv_transport, worker.engine.device, config.engine.tensor_parallel_size)
    servicer = DecodeServicer(worker, config.reservation_ttl_s, config.kv_wait_timeout_s, metrics, transports,
                              strict=config.kv_transport != "auto")
    handle = await create_server(config.server, [servicer], metrics=metrics)
    servicer.address = config.advertise_address or handle.address
    servicer.reaper = asyncio.create_task(servicer.reap_expired())
    await keep_ready(handle, worker, config)
    logger.info("decode serving on %s (sampler %s, kv transports %s)", handle.address,
                config.sample_address or "in-process", ", ".join(servicer.transports))
    return handle, worker


async def serve(config: DecodeServiceConfig) -> None:
    handle, worker = await start(config)
    await serve_until_stopped(handle, worker.stop)
