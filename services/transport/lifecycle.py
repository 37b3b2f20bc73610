"""The life of one KV transfer on each side, as explicit state machines with one exit per state.

Decode side, a `Reservation` in the `ReservationTable`:

    Reserve ─> RESERVED ─first chunk─> RECEIVING ─every layer of every block─> LANDED ─Attach─> ATTACHED
                  │                        │                                      │
                  ├── Cancel, client gone ─┴────────────── RELEASED <─────────────┤
                  ├── RECEIVING only: corrupt or short transfer, checksum         │
                  │   mismatch, sender died mid-stream ─── ABORTED                │
                  └── TTL passed without Attach ────────── EXPIRED <──────────────┘

ATTACHED hands the blocks to the running sequence. Every other terminal state frees them at once
(the table's `free` callback) and keeps the reason, so an Attach that is waiting, or that arrives later,
fails at once with that reason instead of waiting for pages that will never come. A checksum
mismatch is reported as data loss, which the gateway answers by prefilling the request again.

One-sided writers (cuda-ipc) first `claim` the reservation (RESERVED -> RECEIVING). A reservation that
ends while claimed is terminal at once, but its blocks are freed only when the writer's stream ends
(`writer_done`) or its claim lease runs out, so a copy already queued on the GPU never lands in blocks
that were handed to another sequence.

Prefill side, a `Lease` in the `LeaseTable` on the blocks of a finished prompt:

    prompt done ─> HELD ─transfer starts─> SENDING ─receiver acknowledged─> SENT
                     └─────────────────────┴── cancel, decode rejected, decode died, timeout ─> ABORTED

Every terminal state releases the held blocks at once (the caller's `finally`); the stats RPCs report
`active_reservations` and `active_leases`, which are 0 on an idle worker when nothing leaked.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from stageserve.common.errors import DataLossError, InvalidArgumentError, NotFoundError, UnavailableError
from stageserve.transport.base import KVLayout

logger = logging.getLogger(__name__)

_TOMBSTONES = 4096  # reasons of recently ended reservations kept for a late Attach or Cancel


class TransferState(enum.Enum):
    RESERVED = "reserved"
    RECEIVING = "receiving"
    LANDED = "landed"
    ATTACHED = "attached"
    RELEASED = "released"
    ABORTED = "aborted"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({TransferState.ATTACHED, TransferState.RELEASED, TransferState.ABORTED, TransferState.EXPIRED})
_ALLOWED = {
    TransferState.RESERVED: {TransferState.RECEIVING, TransferState.RELEASED, TransferState.EXPIRED, TransferState.ABORTED},
    TransferState.RECEIVING: {TransferState.LANDED, TransferState.RELEASED, TransferState.ABORTED, TransferState.EXPIRED},
    TransferState.LANDED: {TransferState.ATTACHED, TransferState.RELEASED, TransferState.EXPIRED},
}


@dataclass
class Reservation:
    """The decode side's record of one incoming transfer."""

    reservation_id: str
    request_id: str
    block_ids: tuple[int, ...]
    layout: KVLayout
    deadline: float  # monotonic time after which an unattached reservation is reclaimed
    transport: str = "host"
    peer_id: str = ""  # the sender, for transports that keep per-peer state (NCCL communicators)
    state: TransferState = TransferState.RESERVED
    received: dict[int, set[int]] = field(default_factory=dict)  # layer -> blocks landed
    next_chunk: int = 0
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set on LANDED and on every terminal state
    error: str | None = None  # why the transfer ended without landing
    data_loss: bool = False  # the pages arrived corrupt (checksum): the gateway may prefill again
    sender_lost: bool = False  # the sender went away or gave up mid-transfer: another prefill may succeed
    writer_deadline: float | None = None  # a one-sided writer holds a claim until then
    free_pending: bool = False  # ended while claimed: free when the writer is done

    def record(self, layer: int, block_ids: list[int]) -> None:
        """Pages of `layer` for `block_ids` are in the pool; LANDED once every layer of every block is."""
        if self.state is TransferState.RESERVED:
            self._move(TransferState.RECEIVING)
        self.received.setdefault(layer, set()).update(block_ids)
        if self.complete and self.state is TransferState.RECEIVING:
            self._move(TransferState.LANDED)
            self.settled.set()

    @property
    def complete(self) -> bool:
        want = set(self.block_ids)
        return len(self.received) == self.layout.num_layers and all(v == want for v in self.received.values())

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.monotonic()) > self.deadline

    def failure(self) -> Exception:
        """The error an Attach gets for a reservation that ended without landing."""
        reason = f"KV transfer failed: {self.error or self.state.value}"
        if self.data_loss:
            return DataLossError(f"reservation_id: {reason}")
        if self.sender_lost:  # UNAVAILABLE: the gateway retries elsewhere instead of failing the request
            return UnavailableError(f"reservation_id: {reason}")
        return InvalidArgumentError("reservation_id", reason)

    def _move(self, state: TransferState) -> None:
        if state not in _ALLOWED.get(self.state, ()):
            raise InvalidArgumentError("reservation_id", f"reservation is {self.state.value}, cannot become {state.value}")
        self.state = state


FreeBlocks = Callable[[str], Awaitable[object]]  # request id -> frees its blocks in the engine


class ReservationTable:
    """Every open reservation of a decode worker, and the one way each of them ends (`end`)."""

    def __init__(self, free: FreeBlocks):
        self.free = free
        self._by_id: dict[str, Reservation] = {}
        self._by_request: dict[str, str] = {}
        self._ended: OrderedDict[str, Reservation] = OrderedDict()
        self._draining: dict[str, Reservation] = {}  # ended while claimed; blocks not yet freed

    def add(self, reservation: Reservation) -> None:
        self._by_id[reservation.reservation_id] = reservation
        self._by_request[reservation.request_id] = reservation.reservation_id

    def get(self, reservation_id: str, field_name: str) -> Reservation:
        """An open reservation; one that ended raises its failure, an unknown one NotFoundError."""
        reservation = self._by_id.get(reservation_id)
        if reservation is not None:
            return reservation
        ended = self._ended.get(reservation_id)
        if ended is not None and ended.state is not TransferState.ATTACHED:
            raise ended.failure()
        raise NotFoundError(f"{field_name}: no reservation {reservation_id!r}")

    def for_request(self, request_id: str) -> Reservation | None:
        reservation_id = self._by_request.get(request_id)
        return self._by_id.get(reservation_id) if reservation_id is not None else None

    def claim(self, reservation_id: str, lease_s: float, block_ids: list[int]) -> Reservation:
        """A one-sided writer may now write the reservation's blocks (`block_ids`, which must be exactly
        them), for at most `lease_s`."""
        reservation = self.get(reservation_id, "reservation_id")
        if tuple(block_ids) != reservation.block_ids:
            raise InvalidArgumentError("block_ids", "are not this reservation's blocks")
        if reservation.state is not TransferState.RESERVED or reservation.writer_deadline is not None:
            raise InvalidArgumentError("reservation_id", f"reservation is {reservation.state.value}, cannot be claimed")
        reservation._move(TransferState.RECEIVING)
        reservation.writer_deadline = time.monotonic() + lease_s
        return reservation

    async def writer_done(self, reservation: Reservation) -> None:
        """The claiming writer finished (or died): free the blocks now if the reservation ended meanwhile."""
        reservation.writer_deadline = None
        if self._draining.pop(reservation.reservation_id, None) is not None:
            await self.free(reservation.request_id)
            reservation.settled.set()

    async def end(self, reservation: Reservation, state: TransferState, reason: str | None = None,
                  data_loss: bool = False, sender_lost: bool = False) -> bool:
        """Move an open reservation to terminal `state`; frees its blocks unless ATTACHED. False if it had ended."""
        if reservation.state.terminal or self._by_id.get(reservation.reservation_id) is not reservation:
            return False
        reservation._move(state)
        reservation.error, reservation.data_loss, reservation.sender_lost = reason, data_loss, sender_lost
        if state is not TransferState.ATTACHED:
            reservation.received.clear()  # whatever landed is never decoded unless the whole transfer did
        self._by_id.pop(reservation.reservation_id, None)
        if self._by_request.get(reservation.request_id) == reservation.reservation_id:
            self._by_request.pop(reservation.request_id)
        self._ended[reservation.reservation_id] = reservation
        while len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)
        if state is not TransferState.ATTACHED:
            if reason:
                logger.warning("reservation of %s %s: %s", reservation.request_id, state.value, reason)
            if reservation.writer_deadline is not None:  # settles once the writer is done and the blocks are free
                self._draining[reservation.reservation_id] = reservation
                return True
            await self.free(reservation.request_id)
        reservation.settled.set()  # after the free: a woken Attach's caller may reserve the same request again
        return True

    async def expire(self, now: float | None = None) -> int:
        """End every reservation past its deadline; returns how many."""
        now = time.monotonic() if now is None else now
        stale = [r for r in self._by_id.values() if r.expired(now)]
        for reservation in stale:
            await self.end(reservation, TransferState.EXPIRED, "not attached before its TTL")
        for reservation in [r for r in self._draining.values() if r.writer_deadline < now]:
            logger.warning("writer of %s's reservation outlived its claim; freeing its blocks", reservation.request_id)
            await self.writer_done(reservation)
        return len(stale)

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def num_blocks(self) -> int:
        """Blocks of open reservations and of ended ones still waiting for their writer."""
        return sum(len(r.block_ids) for r in (*self._by_id.values(), *self._draining.values()))


class LeaseState(enum.Enum):
    HELD = "held"
    SENDING = "sending"
    SENT = "sent"
    ABORTED = "aborted"


@dataclass
class Lease:
    request_id: str
    num_blocks: int
    state: LeaseState = LeaseState.HELD
    error: str | None = None


class LeaseTable:
    """The prefill side's open leases; `close` is called from the transfer's `finally`, once."""

    def __init__(self):
        self._open: dict[str, Lease] = {}

    def open(self, request_id: str, num_blocks: int) -> Lease:
        lease = Lease(request_id, num_blocks)
        self._open[request_id] = lease
        return lease

    def sending(self, lease: Lease) -> None:
        if lease.state is not LeaseState.HELD:
            raise InvalidArgumentError("request_id", f"lease is {lease.state.value}, cannot start sending")
        lease.state = LeaseState.SENDING

    def close(self, lease: Lease, state: LeaseState, reason: str | None = None) -> None:
        lease.state, lease.error = state, reason
        if self._open.get(lease.request_id) is lease:
            del self._open[lease.request_id]

    def __len__(self) -> int:
        return len(self._open)

    @property
    def num_blocks(self) -> int:
        return sum(lease.num_blocks for lease in self._open.values())
