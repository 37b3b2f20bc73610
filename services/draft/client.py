"""The decode side of the Draft service: a DraftClient over gRPC, with sticky replicas and failure isolation.

It runs on the decode engine's thread, between steps, so it uses synchronous channels. A round (one
decode step) is one ProposeBatch per replica, carrying every sequence pinned to it; the replicas' calls
go out concurrently (futures) and share one deadline. A sequence that its replica answers with a
per-item failure (e.g. NOT_FOUND: evicted there) gets no proposal this step, and the speculator resends
its whole history next step; the other sequences of the batch are unaffected.

Life of a replica:

    UP      calls go to it; each sequence is pinned to one replica (its state lives there)
    a call times out, finds it unavailable, or finds it too old to serve ProposeBatch (UNIMPLEMENTED:
            upgrade draft replicas before decode workers) -> DOWN for `backoff` seconds (doubling,
            capped): its sequences decode without speculation, and no step waits on it again
    backoff over -> one probe proposal is sent without waiting for it; steps keep going
    the probe is answered in time -> UP (the backoff resets once a real proposal succeeds); else DOWN
            again, longer. (A probe proposal, not a health check: a draft whose server answers health
            checks but whose proposer hangs must not cost another timeout.)

So a killed or stalled draft costs at most one `timeout_s`, once, and the output never changes (the
draft only ever proposes; the target verifies). A sequence whose call failed is re-sent its whole
history (`reset`), to any replica that is up.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from stageserve.common import tracing
from stageserve.draft.messages import MAX_BATCH_ITEMS, ProposeResult, batch_to_pb
from stageserve.engine.speculative import DraftCall
from stageserve.v1 import draft_pb2, draft_pb2_grpc

logger = logging.getLogger(__name__)

_PROBE_SEQ = "__stageserve_probe__"
_PROBE = DraftCall(_PROBE_SEQ, [0, 0], 1, reset=True, num_accepted=None)
_REPLICA_DOWN = (
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNIMPLEMENTED,
)  # fmt: skip


@dataclass(eq=False)  # hashed by identity: a round groups its calls by replica
class _Replica:
    address: str
    channel: grpc.Channel
    stub: draft_pb2_grpc.DraftStub
    down_until: float = 0.0  # monotonic; 0 when up
    backoff_s: float = 0.0
    probe: grpc.Future | None = None
    failures: int = 0

    @property
    def is_down(self) -> bool:
        return self.down_until > 0.0


@dataclass
class RemoteDraftStats:
    calls: int = 0  # ProposeBatch round trips sent
    failures: int = 0  # round trips that failed as a whole (timed out, unavailable, refused)
    item_failures: int = 0  # sequences a replica answered with a per-item failure
    replicas_marked_down: int = 0
    by_replica: dict[str, int] = field(default_factory=dict)  # address -> proposals it answered


class _Answered:
    """A blocking call's outcome, read like a future's: `result()` returns the reply or raises its error."""

    def __init__(self, method, request, timeout_s: float, metadata):
        try:
            self._reply, self._error = method(request, timeout=timeout_s, metadata=metadata), None
        except grpc.RpcError as exc:
            self._reply, self._error = None, exc

    def result(self):
        if self._error is not None:
            raise self._error
        return self._reply


class RemoteDraft:
    """A DraftClient that calls Draft service replicas."""

    def __init__(
        self, addresses: Sequence[str], timeout_s: float = 0.5, backoff_s: float = 2.0, max_backoff_s: float = 60.0
    ):
        if not addresses:
            raise ValueError("need at least one draft address")
        self.timeout_s, self.backoff_s, self.max_backoff_s = timeout_s, backoff_s, max_backoff_s
        self.replicas = []
        for address in addresses:
            channel = grpc.insecure_channel(address)
            self.replicas.append(
                _Replica(address, channel, draft_pb2_grpc.DraftStub(channel))
            )
        self.pins: dict[str, _Replica] = {}
        self._releases: set = set()  # Release calls in flight (see `release`)
        self.stats = RemoteDraftStats()

    def propose(self, calls: list[DraftCall]) -> list[list[int] | None]:
        # On the engine thread, inside a step: traced when the step is (the verbose level).
        with tracing.child_span("draft.propose", {"stageserve.draft.sequences": len(calls)}, kind="client") as span:
            results = self._propose(calls)
            span.set_attribute("stageserve.draft.proposed_tokens", sum(len(r) for r in results if r))
        return results

    def _propose(self, calls: list[DraftCall]) -> list[list[int] | None]:
        self._refresh()
        results: list[list[int] | None] = [None] * len(calls)
        pending = self._send(calls)
        self.stats.calls += len(pending)
        for replica, batch, future in pending:
            try:
                reply = future.result()
            except grpc.RpcError as exc:
                self.stats.failures += 1
                if exc.code() in _REPLICA_DOWN:
                    self._mark_down(replica, exc)
                else:
                    logger.warning("draft %s refused a batch of %d: %s", replica.address, len(batch), exc.details())
                continue
            for i, proposal in zip(batch, self._read(replica, [calls[i] for i in batch], reply)):
                results[i] = proposal
        return results

    def _send(self, calls: list[DraftCall]) -> list[tuple[_Replica, list[int], grpc.Future | _Answered]]:
        """One ProposeBatch per replica (more past MAX_BATCH_ITEMS): (replica, indices of its calls, its
        outcome). All but one go out as futures before anything is waited on, so they share one deadline;
        the last is a blocking call on this thread, which spares a hand-off to grpc's polling thread
        (~0.2 ms of a ~0.7 ms round trip on a 2-core CPU), and is the only call of a one-replica step."""
        by_replica: dict[_Replica, list[int]] = {}
        for i, call in enumerate(calls):
            replica = self._replica_for(call)
            if replica is not None:
                by_replica.setdefault(replica, []).append(i)
        metadata = tracing.outgoing_metadata()
        batches = [
            (replica, indices[at : at + MAX_BATCH_ITEMS])
            for replica, indices in by_replica.items()
            for at in range(0, len(indices), MAX_BATCH_ITEMS)
        ]
        requests = [batch_to_pb([calls[i] for i in batch]) for _, batch in batches]
        pending = [
            (replica, batch, replica.stub.ProposeBatch.future(request, timeout=self.timeout_s, metadata=metadata))
            for (replica, batch), request in zip(batches[:-1], requests[:-1])
        ]
        if batches:
            (replica, batch), request = batches[-1], requests[-1]
            pending.append((replica, batch, _Answered(replica.stub.ProposeBatch, request, self.timeout_s, metadata)))
        return pending

    def _read(self, replica: _Replica, calls: list[DraftCall], reply: draft_pb2.ProposeBatchResponse) -> list[list[int] | None]:
        """A replica's answer to its batch: each call's proposal, None where its item failed."""
        if len(reply.results) != len(calls):
            self.stats.failures += 1
            logger.warning("draft %s answered %d results for %d items", replica.address, len(reply.results), len(calls))
            return [None] * len(calls)
        replica.backoff_s = 0.0  # it answers proposals again: a later failure starts the backoff afresh
        proposals: list[list[int] | None] = []
        for call, pb in zip(calls, reply.results):
            result = ProposeResult.from_pb(pb)
            proposals.append(list(result.token_ids) if result.ok else None)
            if result.ok:
                self.stats.by_replica[replica.address] = self.stats.by_replica.get(replica.address, 0) + 1
                continue
            self.stats.item_failures += 1
            # NOT_FOUND is routine (the replica evicted the sequence); anything else is a bug somewhere.
            log = logger.debug if result.status == draft_pb2.PROPOSE_STATUS_NOT_FOUND else logger.warning
            log("draft %s refused %s: %s %s", replica.address, call.seq_id, result.status_name, result.message)
        return proposals

    def release(self, seq_id: str) -> None:
        replica = self.pins.pop(seq_id, None)
        if replica is not None and not replica.is_down:  # fire and forget: nobody waits on a release
            # ...but keep the call referenced until it is done: grpc cancels a future that is collected.
            call = replica.stub.Release.future(draft_pb2.ReleaseRequest(seq_id=seq_id), timeout=self.timeout_s)
            self._releases.add(call)
            call.add_done_callback(self._releases.discard)

    def close(self) -> None:
        for replica in self.replicas:
            replica.channel.close()

    def _replica_for(self, call: DraftCall) -> _Replica | None:
        """The sequence's pinned replica; a reset may move it to any replica that is up."""
        pinned = self.pins.get(call.seq_id)
        if pinned is not None and not pinned.is_down and not call.reset:
            return pinned
        if pinned is not None and not call.reset:
            return None  # its state is on a replica that is down: no speculation until a reset moves it
        up = [r for r in self.replicas if not r.is_down]
        if not up:
            return None
        if pinned is not None and not pinned.is_down:
            return pinned
        replica = up[zlib.crc32(call.seq_id.encode()) % len(up)]  # spread sequences, stable per id
        self.pins[call.seq_id] = replica
        return replica

    def _mark_down(self, replica: _Replica, exc: grpc.RpcError) -> None:
        if replica.is_down:
            return
        replica.backoff_s = min(max(replica.backoff_s * 2, self.backoff_s), self.max_backoff_s)
        replica.down_until = time.monotonic() + replica.backoff_s
        replica.failures += 1
        self.stats.replicas_marked_down += 1
        logger.warning(
            "draft %s failed (%s); decoding without it for %.1f s", replica.address, exc.code().name, replica.backoff_s
        )

    def _refresh(self) -> None:
        """Advance down replicas: send a probe when their backoff ends, and act on answered ones."""
        now = time.monotonic()
        for replica in self.replicas:
            if not replica.is_down:
                continue
            if replica.probe is None:
                if now >= replica.down_until:
                    replica.probe = replica.stub.ProposeBatch.future(batch_to_pb([_PROBE]), timeout=self.timeout_s)
                continue
            if not replica.probe.done():
                continue
            probe, replica.probe = replica.probe, None
            try:
                probe.result()
                answered = True
            except grpc.RpcError:
                answered = False
            if answered:
                replica.down_until = 0.0
                replica.stub.Release.future(draft_pb2.ReleaseRequest(seq_id=_PROBE_SEQ), timeout=self.timeout_s)
                logger.info("draft %s is back", replica.address)
            else:
                replica.backoff_s = min(replica.backoff_s * 2, self.max_backoff_s)
                replica.down_until = now + replica.backoff_s
