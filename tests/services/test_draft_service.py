"""The Draft service on a real grpc.aio server (port 0): Propose / ProposeBatch / Accept / Release over the
n-gram proposer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stageserve.common.config import parse_config
from stageserve.common.errors import InvalidArgumentError
from stageserve.common.server import ServerConfig
from stageserve.draft.messages import MAX_BATCH_ITEMS
from stageserve.draft.ngram import MAX_K, NgramProposer
from stageserve.draft.service import DraftServiceConfig, serve, start
from stageserve.v1 import draft_pb2, draft_pb2_grpc

SERVICE = "stageserve.v1.Draft"


@contextlib.asynccontextmanager
async def serving(proposer: NgramProposer | None = None, **server) -> AsyncIterator[draft_pb2_grpc.DraftStub]:
    handle = await start(DraftServiceConfig(server=ServerConfig(**server)), proposer)
    try:
        async with grpc.aio.insecure_channel(handle.address) as channel:
            yield draft_pb2_grpc.DraftStub(channel)
    finally:
        await handle.stop(grace=0)


async def propose(stub, seq_id: str, new: list[int], k: int) -> list[int]:
    reply = await stub.Propose(draft_pb2.ProposeRequest(seq_id=seq_id, new_token_ids=new, k=k))
    return list(reply.token_ids)


def test_decode_loop_over_a_repetitive_sequence():
    proposer = NgramProposer()

    async def body():
        async with serving(proposer) as stub:
            prompt = [10, 11, 12, 13, 14] * 3
            assert await propose(stub, "req-1", prompt, k=4) == [10, 11, 12, 13]
            # The target model accepted 3 and sampled 13 itself.
            await stub.Accept(draft_pb2.AcceptRequest(seq_id="req-1", num_accepted=3))
            assert await propose(stub, "req-1", [10, 11, 12, 13], k=4) == [14, 10, 11, 12]
            await stub.Accept(draft_pb2.AcceptRequest(seq_id="req-1", num_accepted=4))
            # Another sequence is independent.
            assert await propose(stub, "req-2", [1, 2, 3], k=4) == []
            assert (await stub.Release(draft_pb2.ReleaseRequest(seq_id="req-1"))).found
            assert not (await stub.Release(draft_pb2.ReleaseRequest(seq_id="req-1"))).found

    asyncio.run(body())
    assert proposer.stats.num_accepted_tokens == 7
    assert proposer.stats.num_proposed_tokens == 8
    assert "req-1" not in proposer and "req-2" in proposer


@pytest.mark.parametrize(
    ("method", "request_pb", "code", "details"),
    [
        ("Propose", draft_pb2.ProposeRequest(seq_id="s", new_token_ids=[1], k=0), "INVALID_ARGUMENT", "k: must be in"),
        ("Propose", draft_pb2.ProposeRequest(seq_id="s", new_token_ids=[1], k=17), "INVALID_ARGUMENT", "k:"),
        ("Propose", draft_pb2.ProposeRequest(new_token_ids=[1], k=2), "INVALID_ARGUMENT", "seq_id:"),
        ("Propose", draft_pb2.ProposeRequest(seq_id="s", new_token_ids=[3, -1], k=2), "INVALID_ARGUMENT", "new_token_"),
        ("Accept", draft_pb2.AcceptRequest(seq_id="ghost", num_accepted=0), "NOT_FOUND", "sequence 'ghost'"),
        ("Accept", draft_pb2.AcceptRequest(seq_id="known", num_accepted=2), "INVALID_ARGUMENT", "num_accepted:"),
    ],
)
def test_bad_requests_get_status_codes_and_the_server_keeps_serving(method, request_pb, code, details):
    async def body():
        async with serving() as stub:
            assert await propose(stub, "known", [1, 2, 1], k=1) == [2]  # a proposal of length 1
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await getattr(stub, method)(request_pb)
            assert info.value.code() == getattr(grpc.StatusCode, code)
            assert info.value.details().startswith(details), info.value.details()
            assert await propose(stub, "known", [2], k=2) == [1, 2]

    asyncio.run(body())


OK, BAD, GONE = draft_pb2.PROPOSE_STATUS_OK, draft_pb2.PROPOSE_STATUS_INVALID_ARGUMENT, draft_pb2.PROPOSE_STATUS_NOT_FOUND


def item(seq_id: str, new: list[int], k: int = 4, reset: bool = False, accepted: int | None = None):
    return draft_pb2.ProposeRequest(seq_id=seq_id, new_token_ids=new, k=k, reset=reset, num_accepted=accepted)


def test_propose_batch_answers_every_item_in_order_and_a_bad_item_fails_alone():
    proposer = NgramProposer()
    repeat = [10, 11, 12, 13, 14] * 3

    async def body():
        async with serving(proposer) as stub:
            reply = await stub.ProposeBatch(draft_pb2.ProposeBatchRequest(items=[
                item("a", repeat, reset=True),
                item("ghost", [1, 2], accepted=0),  # never started here, and no reset: NOT_FOUND
                item("b", [7, 8, 7], k=2, reset=True),
                item("c", [1, 1], k=0, reset=True),  # k out of range
                item("d", [3, -1], reset=True),  # a negative token id
                item("e", [5, 6], k=MAX_K + 1, reset=True),
                item("f", [4, 4, 4], k=1, reset=True),
            ]))  # fmt: skip
            statuses = [(r.status, list(r.token_ids)) for r in reply.results]
            assert statuses == [(OK, [10, 11, 12, 13]), (GONE, []), (OK, [8, 7]), (BAD, []), (BAD, []), (BAD, []),
                                (OK, [4])]  # fmt: skip
            messages = [r.message.split(":")[0] for r in reply.results]
            assert messages == ["", "sequence 'ghost' is not held here (evicted or released); resend it with reset",
                                "", "k", "new_token_ids[1]", "k", ""]  # fmt: skip
            # The next step: each sequence sends only its new tokens and how many drafts were accepted.
            reply = await stub.ProposeBatch(draft_pb2.ProposeBatchRequest(items=[
                item("b", [8, 7, 8], k=2, accepted=2),  # both drafts accepted, then 8 sampled
                item("a", [10, 11, 12, 13], accepted=3),
                item("f", [4], k=1, accepted=5),  # more accepted than were proposed
            ]))  # fmt: skip
            assert [(r.status, list(r.token_ids)) for r in reply.results] == [(OK, [7, 8]), (OK, [14, 10, 11, 12]), (BAD, [])]
            assert reply.results[2].message.startswith("num_accepted:")

    asyncio.run(body())
    assert "ghost" not in proposer and proposer.history("a") == repeat + [10, 11, 12, 13]
    assert proposer.stats.num_accepted_tokens == 5


def test_propose_batch_matches_one_propose_per_sequence():
    calls = [("x", [1, 2, 3, 1, 2], 3), ("y", [9, 9, 8, 9], 2), ("z", [5], 1)]

    async def body():
        async with serving() as batched, serving() as single:
            batch = draft_pb2.ProposeBatchRequest(items=[item(s, new, k, reset=True) for s, new, k in calls])
            got = [list(r.token_ids) for r in (await batched.ProposeBatch(batch)).results]
            assert got == [await propose(single, s, new, k) for s, new, k in calls]

    asyncio.run(body())


@pytest.mark.parametrize(
    ("items", "details"),
    [
        ([item(f"s{i}", [1], reset=True) for i in range(MAX_BATCH_ITEMS + 1)], f"items: at most {MAX_BATCH_ITEMS}"),
        ([item("s", [1], reset=True), item("t", [2], reset=True), item("s", [3], reset=True)],
         "items[2].seq_id: repeats items[0].seq_id"),
        ([item("s", [1], reset=True), item("", [2], reset=True)], "items[1].seq_id: must be non-empty"),
    ],
)
def test_a_malformed_batch_fails_as_a_whole_and_changes_nothing(items, details):
    proposer = NgramProposer()

    async def body():
        async with serving(proposer) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ProposeBatch(draft_pb2.ProposeBatchRequest(items=items))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith(details), info.value.details()
            assert len((await stub.ProposeBatch(draft_pb2.ProposeBatchRequest())).results) == 0

    asyncio.run(body())
    assert len(proposer) == 0


def test_eviction_is_visible_as_not_found():
    async def body():
        async with serving(NgramProposer(max_sequences=1)) as stub:
            await propose(stub, "a", [1, 1], k=1)
            await propose(stub, "b", [2, 2], k=1)  # evicts a
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Accept(draft_pb2.AcceptRequest(seq_id="a", num_accepted=0))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(body())


def test_oversized_request_is_rejected():
    async def body():
        async with serving(max_receive_message_bytes=2048) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await propose(stub, "s", list(range(100_000, 101_000)), k=4)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await propose(stub, "s", [5, 6, 5], k=4) == [6, 5]

    asyncio.run(body())


def test_config_from_flags_and_bounds():
    config = parse_config(DraftServiceConfig, ["--max-n", "4", "--min-n", "2", "--max-sequences", "8"])
    proposer = config.make_proposer()
    assert (proposer.ngram_sizes, proposer.max_sequences) == (range(2, 5), 8)
    with pytest.raises(InvalidArgumentError) as info:
        DraftServiceConfig(max_n=1, min_n=2)
    assert info.value.field == "min_n"
    with pytest.raises(InvalidArgumentError):
        parse_config(DraftServiceConfig, ["--max-history", "4"])


def test_serve_reports_ready_and_stops_when_cancelled():
    with socket.socket() as probe:  # a free port: serve() does not hand back the one it bound
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def body():
        task = asyncio.create_task(serve(DraftServiceConfig(server=ServerConfig(port=port, grace_s=0))))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), wait_for_ready=True, timeout=10)
            async for reply in watch:  # NOT_SERVING may come first, between bind and set_ready
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            watch.cancel()
            assert await propose(draft_pb2_grpc.DraftStub(channel), "s", [4, 4], k=1) == [4]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(body())
