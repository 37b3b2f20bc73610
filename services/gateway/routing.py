"""Which worker of a role gets the next call, and which workers are in rotation at all.

Life of a worker here: in rotation (calls go to it) -> a call fails with UNAVAILABLE, a probe is refused
(UNAVAILABLE), or `probe_misses` probes in a row time out -> out of rotation (no calls; probed every poll
interval) -> a probe succeeds -> in rotation. A single late answer (a worker busy with a long step, or a
loaded host) only counts a miss: taking the only worker of a role out for it would fail every new request.
Workers start in rotation; the first poll, run before the gateway reports ready, sorts out the dead ones.

Policies, each a sort key over a worker's load (lowest wins, ties go round-robin):
- decode: most free KV blocks from the last Stats poll, less the blocks this gateway reserved since
  (so a burst between two polls spreads out instead of piling onto one worker), then fewest in flight;
- prefill and tokenizer: fewest calls in flight from this gateway.
`choose` never waits: with no worker of a role in rotation it raises UnavailableError at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stageserve.common.errors import UnavailableError
from stageserve.common.security import SecurityConfig, aio_channel
from stageserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc, tokenizer_pb2_grpc

logger = logging.getLogger(__name__)

# A worker that comes back should be back in rotation within a poll or two, not after grpc's
# default reconnect backoff (which grows to two minutes).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)
# Status codes that say "this worker is not there", as opposed to "this request was bad".
DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
PROBE_DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(eq=False)
class Worker:
    """One worker of one role, as this gateway sees it."""

    address: str
    stub: Any  # the role's generated stub on `channel`
    channel: grpc.aio.Channel | None = None  # shared by every role's worker at this address
    available: bool = True
    in_flight: int = 0  # this gateway's calls (or, for decode, requests) on it right now
    free_blocks: int | None = None  # from the last Stats poll; None before the first
    pending_blocks: int = 0  # blocks reserved through this gateway since that poll (or being reserved now)
    block_size: int = 0  # decode: tokens per KV block, from the last Stats poll; 0 before the first
    last_error: str = ""
    probe_misses: int = 0  # probes in a row that timed out while in rotation
    host_id: str = ""  # prefill: its host, from the last Stats poll (decode offers cuda-ipc only on the same one)
    kv_transports: tuple[str, ...] = ()  # prefill: what it can send KV over, best first
    # Requests streaming from this worker: each is told at once when the worker is found gone, so it
    # fails (or moves elsewhere) within a poll instead of waiting out stream_idle_timeout_s.
    on_lost: set[Callable[[str], None]] = field(default_factory=set)

    def headroom(self) -> int:
        return (self.free_blocks or 0) - self.pending_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """The blocks `num_tokens` will take on this worker, as far as this gateway knows its block size."""
        return -(-num_tokens // self.block_size) if self.block_size > 0 else 1


def least_in_flight(worker: Worker) -> tuple:
    return (worker.in_flight,)


def most_kv_headroom(worker: Worker) -> tuple:
    return (-worker.headroom(), worker.in_flight)


Probe = Callable[[Worker, float], Awaitable[None]]


DNS_PREFIX = "dns+"  # `dns+decode:50051`: one worker per address the name resolves to, re-resolved each poll


async def resolve_addresses(address: str) -> list[str]:
    """`dns+HOST:PORT` -> every `IP:PORT` HOST resolves to now (sorted); any other address -> itself."""
    if not address.startswith(DNS_PREFIX):
        return [address]
    host, _, port = address[len(DNS_PREFIX) :].rpartition(":")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        logger.warning("cannot resolve %s: %s", address, exc)
        return []
    ips = {info[4][0] for info in infos}
    return sorted(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips)


class WorkerPool:
    """The workers of one role, the policy that picks among them, and their rotation state.

    Workers come from configured addresses. A `dns+HOST:PORT` address stands for every replica behind
    a name (a headless Kubernetes Service, a scaled compose service): `refresh()` re-resolves it,
    adds new replicas, and drops vanished ones once nothing is in flight on them.
    """

    def __init__(
        self,
        role: str,
        workers: Iterable[Worker],
        key: Callable[[Worker], tuple],
        probe: Probe,
        sources: Iterable[str] = (),
        make_worker: Callable[[str], Worker] | None = None,
    ):
        self.role = role
        self.workers = list(workers)
        self._key = key
        self._probe = probe
        self._turn = 0  # round-robin among equally loaded workers
        self.sources = list(sources)
        self._make_worker = make_worker

    async def refresh(self) -> None:
        """Bring the worker list in line with what the configured addresses resolve to now."""
        if not any(a.startswith(DNS_PREFIX) for a in self.sources) or self._make_worker is None:
            return
        wanted: list[str] = []
        for source in self.sources:
            wanted += await resolve_addresses(source)
        wanted = list(dict.fromkeys(wanted))
        known = {w.address: w for w in self.workers}
        kept = [w for w in self.workers if w.address in wanted or w.in_flight > 0]
        added = [self._make_worker(a) for a in wanted if a not in known]
        for worker in added:
            logger.info("%s replica %s joined", self.role, worker.address)
        for worker in self.workers:
            if worker.address not in wanted:
                self.mark_down(worker, "no longer resolved")
        self.workers = kept + added

    def choose(self, exclude: Iterable[Worker] = ()) -> Worker:
        """The best worker in rotation and not in `exclude`; UnavailableError at once if there is none."""
        excluded = set(exclude)
        candidates = [w for w in self.workers if w.available and w not in excluded]
        if not candidates:
            errors = "; ".join(f"{w.address}: {w.last_error}" for w in self.workers if w.last_error)
            raise UnavailableError(
                f"no {self.role} worker is available ({len(self.workers)} configured"
                + (f", {len(excluded)} already tried" if excluded else "")
                + (f"; {errors}" if errors else "")
                + ")"
            )
        best = min(self._key(w) for w in candidates)
        ties = [w for w in candidates if self._key(w) == best]
        self._turn += 1
        return ties[self._turn % len(ties)]

    def mark_down(self, worker: Worker, error: str, lost: bool = True) -> None:
        """Take `worker` out of rotation until a probe succeeds. `lost` (it failed, rather than said
        NOT_SERVING, as a draining worker does) also tells the requests streaming from it."""
        if worker.available:
            logger.warning("%s worker %s out of rotation: %s", self.role, worker.address, error)
        worker.available = False
        worker.last_error = error
        if lost:
            for notify in list(worker.on_lost):
                notify(error)

    def mark_up(self, worker: Worker) -> None:
        if not worker.available:
            logger.info("%s worker %s back in rotation", self.role, worker.address)
        worker.available = True
        worker.last_error = ""
        worker.probe_misses = 0

    @contextlib.contextmanager
    def track(self, worker: Worker) -> Iterator[Worker]:
        """Count a call (or request) on `worker` as in flight for the block."""
        worker.in_flight += 1
        try:
            yield worker
        finally:
            worker.in_flight -= 1

    async def probe_all(self, timeout_s: float, misses: int = 1) -> None:
        """Probe every worker at once; each result updates rotation (and, for decode, the KV headroom). A
        worker in rotation leaves it after `misses` timeouts in a row, or at once when refused."""
        await asyncio.gather(*(self._probe_one(w, timeout_s, misses) for w in self.workers))

    async def _probe_one(self, worker: Worker, timeout_s: float, misses: int) -> None:
        try:
            await self._probe(worker, timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and worker.available:
                worker.probe_misses += 1
                if worker.probe_misses < misses:
                    logger.warning("%s worker %s missed a probe (%d of %d before it leaves rotation)",
                                   self.role, worker.address, worker.probe_misses, misses)  # fmt: skip
                    return
            # Another status (UNIMPLEMENTED, say) proves the worker answers; it keeps whatever state it had.
            if exc.code() in PROBE_DOWN_CODES or not worker.available:
                self.mark_down(worker, f"probe: {exc.code().name}: {exc.details()}")
            return
        except NotServingError as exc:
            self.mark_down(worker, f"probe: {exc}", lost=False)  # draining or wedged: in-flight work may end
            return
        self.mark_up(worker)


async def probe_decode(worker: Worker, timeout_s: float) -> None:
    """Readiness (a draining or wedged worker says NOT_SERVING), then Stats for the KV headroom."""
    await _check_ready(worker, "stageserve.v1.Decode", timeout_s)
    reply = await worker.stub.Stats(decode_pb2.DecodeStatsRequest(), timeout=timeout_s)
    worker.free_blocks = reply.pool.free_blocks
    worker.block_size = reply.pool.block_size
    worker.pending_blocks = 0  # the poll already counts every reservation made before it


async def probe_prefill(worker: Worker, timeout_s: float) -> None:
    await _check_ready(worker, "stageserve.v1.Prefill", timeout_s)
    reply = await worker.stub.Stats(prefill_pb2.PrefillStatsRequest(), timeout=timeout_s)
    worker.host_id, worker.kv_transports = reply.host_id, tuple(reply.kv_transports)


async def _check_ready(worker: Worker, service: str, timeout_s: float) -> None:
    stub = health_pb2_grpc.HealthStub(worker.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise NotServingError(f"{service} is not SERVING")


def health_probe(service: str) -> Probe:
    """A probe through the standard health service's readiness of `service` (the tokenizer has no Stats)."""

    async def probe(worker: Worker, timeout_s: float) -> None:
        await _check_ready(worker, service, timeout_s)

    return probe


class NotServingError(Exception):
    """A worker answered its probe but says it is not ready (health NOT_SERVING)."""


@dataclass
class Router:
    """The gateway's three worker pools over one reused channel per address, and the poller that keeps
    their load and rotation state fresh."""

    tokenizers: WorkerPool
    prefills: WorkerPool
    decodes: WorkerPool
    channels: dict[str, grpc.aio.Channel]
    poll_interval_s: float
    probe_timeout_s: float
    probe_misses: int = 1
    _task: asyncio.Task | None = field(default=None, repr=False)

    @classmethod
    def connect(
        cls,
        tokenizer_addresses: Iterable[str],
        prefill_addresses: Iterable[str],
        decode_addresses: Iterable[str],
        poll_interval_s: float,
        probe_timeout_s: float,
        security: SecurityConfig | None = None,
        probe_misses: int = 1,
    ) -> Router:
        channels: dict[str, grpc.aio.Channel] = {}

        def channel(address: str) -> grpc.aio.Channel:
            if address not in channels:
                channels[address] = aio_channel(address, security, CHANNEL_OPTIONS)
            return channels[address]

        def pool(role: str, addresses: Iterable[str], stub_class: type, key, probe: Probe) -> WorkerPool:
            def make(address: str) -> Worker:
                return Worker(address, stub_class(channel(address)), channel(address))

            addresses = list(dict.fromkeys(addresses))  # a repeated address is one worker
            static = [make(a) for a in addresses if not a.startswith(DNS_PREFIX)]  # dns+ ones fill in on refresh
            return WorkerPool(role, static, key, probe, sources=addresses, make_worker=make)

        return cls(
            tokenizers=pool("tokenizer", tokenizer_addresses, tokenizer_pb2_grpc.TokenizerStub, least_in_flight,
                            health_probe("stageserve.v1.Tokenizer")),
            prefills=pool("prefill", prefill_addresses, prefill_pb2_grpc.PrefillStub, least_in_flight, probe_prefill),
            decodes=pool("decode", decode_addresses, decode_pb2_grpc.DecodeStub, most_kv_headroom, probe_decode),
            channels=channels,
            poll_interval_s=poll_interval_s,
            probe_timeout_s=probe_timeout_s,
            probe_misses=probe_misses,
        )

    @property
    def pools(self) -> tuple[WorkerPool, ...]:
        return (self.tokenizers, self.prefills, self.decodes)

    async def poll_once(self) -> None:
        await asyncio.gather(*(pool.refresh() for pool in self.pools))
        await asyncio.gather(*(pool.probe_all(self.probe_timeout_s, self.probe_misses) for pool in self.pools))

    async def start(self) -> None:
        """Poll once (so dead workers are out of rotation before the first request), then keep polling."""
        await self.poll_once()
        self._task = asyncio.create_task(self._poll_forever(), name="gateway-stats-poller")

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # a poller that dies silently would freeze routing; log and keep going
                logger.exception("stats poll failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(channel.close() for channel in self.channels.values()))
