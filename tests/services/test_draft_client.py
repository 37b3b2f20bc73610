"""RemoteDraft against real Draft servers (port 0): one ProposeBatch per replica per round, per-item
failures isolated to their sequence, and a killed, stalled or outdated replica costing at most one timeout.

The servers run on an event loop in a background thread, because RemoteDraft is a blocking client.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib

import pytest

from stageserve.common.server import ServerConfig, create_server
from stageserve.draft.client import RemoteDraft
from stageserve.draft.local import LocalDraft
from stageserve.draft.ngram import NgramProposer
from stageserve.draft.service import DraftServiceConfig, DraftServicer, start
from stageserve.engine.speculative import DraftCall
from stageserve.v1 import draft_pb2_grpc

HISTORIES = [[1, 2, 3, 1, 2], [9, 9, 8, 9], [4, 5, 6, 4, 5, 6, 4], [7, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [8, 6, 8]]


class Stalling:
    """An n-gram proposer that, once armed, blocks every proposal until released: a hung draft whose server
    still answers health checks. Not an NgramProposer, so the server runs it on its worker thread."""

    def __init__(self):
        self.inner = NgramProposer()
        self.armed, self.released = threading.Event(), threading.Event()

    def propose(self, seq_id, new_tokens, k):
        if self.armed.is_set():
            self.released.wait(30)
        return self.inner.propose(seq_id, new_tokens, k)

    def accept(self, seq_id, num_accepted):
        self.inner.accept(seq_id, num_accepted)

    def release(self, seq_id):
        return self.inner.release(seq_id)

    def __contains__(self, seq_id):
        return seq_id in self.inner


class Outdated(DraftServicer):
    """A replica from before ProposeBatch existed: it answers UNIMPLEMENTED."""

    ProposeBatch = draft_pb2_grpc.DraftServicer.ProposeBatch


class Replicas:
    """Draft servers on one event loop in a background thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="draft-replicas", daemon=True)
        self.thread.start()
        self.handles: list = []

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def add(self, proposer, outdated: bool = False) -> str:
        server = ServerConfig(host="127.0.0.1", port=0)
        if outdated:
            handle = self.run(create_server(server, [Outdated(proposer)]))
        else:
            handle = self.run(start(DraftServiceConfig(server=server), proposer))
        self.handles.append(handle)
        return handle.address

    def stop(self, address: str) -> None:
        self.run(next(h for h in self.handles if h.address == address).stop(grace=0))

    def close(self) -> None:
        for handle in self.handles:
            self.run(handle.stop(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def replicas():
    r = Replicas()
    yield r
    r.close()


def first_calls(seq_ids: list[str], k: int = 3) -> list[DraftCall]:
    return [DraftCall(s, HISTORIES[i % len(HISTORIES)], k, reset=True, num_accepted=None) for i, s in enumerate(seq_ids)]


def next_calls(seq_ids: list[str], k: int = 3) -> list[DraftCall]:
    return [DraftCall(s, [i % 5, 1], k, reset=False, num_accepted=0) for i, s in enumerate(seq_ids)]


def split_ids(n: int) -> list[str]:
    """n sequence ids that two replicas both get some of (RemoteDraft spreads them by crc32)."""
    ids = [f"seq-{i}" for i in range(n)]
    assert {zlib.crc32(s.encode()) % 2 for s in ids} == {0, 1}
    return ids


def test_one_round_trip_per_replica_and_proposals_in_call_order(replicas):
    proposers = [NgramProposer(), NgramProposer()]
    client = RemoteDraft([replicas.add(p) for p in proposers], timeout_s=5.0)
    local = LocalDraft(NgramProposer())
    ids = split_ids(8)
    for calls in (first_calls(ids), next_calls(ids), next_calls(ids[::-1], k=2)):
        assert client.propose(calls) == local.propose(calls)
    assert client.stats.calls == 3 * 2, "one ProposeBatch per replica per round, however many sequences"
    assert client.stats.failures == client.stats.item_failures == 0
    for replica, proposer in zip(client.replicas, proposers):
        assert {s for s in ids if client.pins[s] is replica} == {s for s in ids if s in proposer}
    client.close()


def test_a_failed_item_gets_none_and_the_rest_of_its_batch_is_answered(replicas):
    proposer = NgramProposer()
    client = RemoteDraft([replicas.add(proposer)], timeout_s=5.0)
    ids = ["a", "b", "c"]
    assert all(p is not None for p in client.propose(first_calls(ids)))
    replicas.run(asyncio.to_thread(proposer.release, "b"))  # evicted on the replica, on its own loop
    got = client.propose(next_calls(ids))
    assert got[1] is None and got[0] is not None and got[2] is not None
    assert (client.stats.item_failures, client.stats.failures, client.stats.replicas_marked_down) == (1, 0, 0)
    # The speculator resends a failed sequence's whole history with reset; the replica takes it back.
    assert client.propose([first_calls(ids)[1], *next_calls(["a"])])[0] is not None
    assert "b" in proposer
    client.close()


@pytest.mark.parametrize("failure", ["killed", "stalled", "outdated"])
def test_a_broken_replica_costs_at_most_one_timeout_and_the_other_keeps_answering(replicas, failure):
    timeout_s = 0.4
    healthy, broken = NgramProposer(), Stalling()
    addresses = [replicas.add(healthy), replicas.add(broken, outdated=failure == "outdated")]
    client = RemoteDraft(addresses, timeout_s=timeout_s, backoff_s=60.0)
    ids = split_ids(8)
    on_broken = [s for s in ids if zlib.crc32(s.encode()) % 2 == 1]
    try:
        if failure != "outdated":
            assert all(p is not None for p in client.propose(first_calls(ids)))
        if failure == "killed":
            replicas.stop(addresses[1])
        elif failure == "stalled":
            broken.armed.set()
        calls = first_calls(ids) if failure == "outdated" else next_calls(ids)
        start = time.monotonic()
        got = client.propose(calls)
        assert time.monotonic() - start < timeout_s + 0.3
        assert [p is None for p in got] == [s in on_broken for s in ids]
        assert client.stats.replicas_marked_down == 1 and client.stats.failures == 1
        # Later rounds wait on nothing: the broken replica's sequences move with their reset to the healthy one.
        calls = [first_calls([s])[0] if s in on_broken else next_calls([s])[0] for s in ids]
        start = time.monotonic()
        assert all(p is not None for p in client.propose(calls))
        assert time.monotonic() - start < timeout_s
        assert client.stats.failures == 1 and all(s in healthy for s in ids)
    finally:
        broken.released.set()
        client.close()
