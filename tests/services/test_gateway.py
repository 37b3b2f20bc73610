"""The Gateway service end to end on real grpc.aio servers (port 0): the real tokenizer service, and fake
prefill and decode workers that follow the prefill.proto / decode.proto contracts and record every call."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import grpc.aio
import pytest

from stageserve.common.errors import ResourceExhaustedError, UnavailableError
from stageserve.common.server import ServerConfig, ServerHandle, create_server
from stageserve.gateway import commands
from stageserve.gateway.client import GatewayClient, Generation, build_request
from stageserve.gateway.config import GatewayServiceConfig
from stageserve.gateway.routing import Worker, WorkerPool, least_in_flight, most_kv_headroom
from stageserve.gateway.service import GatewayHandle
from stageserve.gateway.service import start as start_gateway
from stageserve.sample.params import SamplingParams
from stageserve.tokenizer.service import TokenizerServiceConfig, TokenizerServicer
from stageserve.tokenizer.service import start as start_tokenizer
from stageserve.tokenizer.text_tokenizer import TextTokenizer
from stageserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2_grpc, prefill_pb2, prefill_pb2_grpc

PROMPT = "Write one sentence about a fox."
OUTPUT = " The quick brown fox jumps over the lazy dog. Café 😀 déjà vu, naïve façade!"
BLOCK_SIZE = 16
LENGTH = common_pb2.FINISH_REASON_LENGTH
STOP = common_pb2.FINISH_REASON_STOP


@pytest.fixture(scope="module")
def output_ids(tokenizer) -> list[int]:
    """What the fakes generate: text with accents and an emoji split over several tokens mid-stream."""
    return tokenizer.encode(OUTPUT)


def run(body):
    return asyncio.run(asyncio.wait_for(body(), timeout=30))


def chunked(ids: list[int], sizes=(1, 3, 2, 4)) -> list[list[int]]:
    """Split ids into events of varying sizes, as a decode worker accepting draft tokens would send them."""
    chunks, i, turn = [], 0, 0
    while i < len(ids):
        size = sizes[turn % len(sizes)]
        chunks.append(ids[i : i + size])
        i, turn = i + size, turn + 1
    return chunks


class FakePrefill(prefill_pb2_grpc.PrefillServicer):
    """Returns a fixed first token; records Prefill and Cancel calls."""

    def __init__(self, first_token: int, finish_reason: int = 0, cached: int = 0):
        self.first_token, self.finish_reason, self.cached = first_token, finish_reason, cached
        self.requests: list[prefill_pb2.PrefillRequest] = []
        self.cancelled: list[str] = []

    async def Prefill(self, request, context):
        self.requests.append(request)
        return prefill_pb2.PrefillResponse(
            first_token=common_pb2.SampledToken(token_id=self.first_token, logprob=-0.5),
            num_cached_tokens=self.cached,
            num_computed_tokens=len(request.prompt_token_ids) - self.cached,
            finish_reason=self.finish_reason,
        )

    async def Cancel(self, request, context):
        self.cancelled.append(request.request_id)
        return prefill_pb2.PrefillCancelResponse(found=False)

    async def Stats(self, request, context):
        return prefill_pb2.PrefillStatsResponse(
            pool=common_pb2.KVPoolStats(total_blocks=64, free_blocks=64), host_id="host-a",
            kv_transports=["cuda-ipc", "nccl", "host"],
        )


class FakeDecode(decode_pb2_grpc.DecodeServicer):
    """Streams scripted token events after the first token, up to max_tokens; records Reserve, Attach, Cancel."""

    def __init__(self, chunks: list[list[int]], finish_reason=LENGTH, delay_s: float = 0.0, free_blocks: int = 64):
        self.chunks, self.finish_reason, self.delay_s = chunks, finish_reason, delay_s
        self.free_blocks = free_blocks
        self.full = False
        self.gate: asyncio.Event | None = None  # when set, Attach waits for it before streaming
        self.reserved: dict[str, decode_pb2.ReserveRequest] = {}
        self.attached: list[decode_pb2.AttachRequest] = []
        self.cancelled: list[str] = []
        self.attach_cancelled = False
        self.reserve_delay_s = 0.0

    async def Reserve(self, request, context):
        if self.full:
            raise ResourceExhaustedError("no free blocks")
        await asyncio.sleep(self.reserve_delay_s)
        self.reserved[request.request_id] = request
        num_blocks = -(-request.num_tokens // BLOCK_SIZE)
        descriptor = common_pb2.KVTransferDescriptor(
            transport="host",
            reservation_id=f"res-{request.request_id}",
            block_ids=range(num_blocks),
            layout=common_pb2.KVLayout(num_layers=2, block_size=BLOCK_SIZE, num_kv_heads=1, head_dim=8),
        )
        return decode_pb2.ReserveResponse(descriptor=descriptor)

    async def Attach(self, request, context):
        self.attached.append(request)
        try:
            if self.gate is not None:
                await self.gate.wait()
            produced, max_tokens = 1, request.sampling_params.max_tokens
            for i, chunk in enumerate(self.chunks):
                await asyncio.sleep(self.delay_s)
                chunk = chunk[: max_tokens - produced]
                produced += len(chunk)
                finish = LENGTH if produced == max_tokens else self.finish_reason if i == len(self.chunks) - 1 else 0
                yield decode_pb2.TokenEvent(
                    tokens=[common_pb2.SampledToken(token_id=t, logprob=-0.25) for t in chunk],
                    finish_reason=finish,
                    num_output_tokens=produced,
                )
                if finish:
                    return
        except asyncio.CancelledError:
            self.attach_cancelled = True
            raise

    async def Cancel(self, request, context):
        self.cancelled.append(request.request_id)
        return decode_pb2.DecodeCancelResponse(found=request.request_id in self.reserved)

    async def Stats(self, request, context):
        pool = common_pb2.KVPoolStats(total_blocks=128, free_blocks=self.free_blocks, block_size=BLOCK_SIZE)
        return decode_pb2.DecodeStatsResponse(pool=pool)


@dataclass
class Cluster:
    gateway: GatewayHandle
    client: GatewayClient
    stub: gateway_pb2_grpc.GatewayStub
    prefills: list[FakePrefill]
    decodes: list[FakeDecode]
    decode_handles: list[ServerHandle]
    handles: list[ServerHandle] = field(default_factory=list)


async def serve_fake(servicer, port: int = 0) -> ServerHandle:
    handle = await create_server(ServerConfig(port=port), [servicer])
    await handle.set_ready(True)
    return handle


@contextlib.asynccontextmanager
async def cluster(
    tokenizer: TextTokenizer,
    prefills: list[FakePrefill],
    decodes: list[FakeDecode],
    extra_decode_addresses: tuple[str, ...] = (),
    **gateway_options,
) -> AsyncIterator[Cluster]:
    handles: list[ServerHandle] = []
    try:
        handles.append(await start_tokenizer(TokenizerServiceConfig(), tokenizer))
        prefill_handles = [await serve_fake(p) for p in prefills]
        decode_handles = [await serve_fake(d) for d in decodes]
        handles += prefill_handles + decode_handles
        config = GatewayServiceConfig(
            tokenizer_addresses=(handles[0].address,),
            prefill_addresses=tuple(h.address for h in prefill_handles),
            decode_addresses=tuple(h.address for h in decode_handles) + extra_decode_addresses,
            **{"stats_poll_interval_s": 0.05, "rpc_timeout_s": 5.0, **gateway_options},
        )
        gateway = await start_gateway(config)
        handles.append(gateway)
        async with GatewayClient(gateway.address) as client, grpc.aio.insecure_channel(gateway.address) as channel:
            yield Cluster(
                gateway, client, gateway_pb2_grpc.GatewayStub(channel), prefills, decodes, decode_handles, handles
            )
    finally:
        for handle in reversed(handles):
            await handle.stop(grace=0)


def simple_cluster(tokenizer, output_ids, **kwargs):
    """One prefill whose first token is output_ids[0], one decode streaming the rest."""
    decode_options = {k: kwargs.pop(k) for k in ("finish_reason", "delay_s") if k in kwargs}
    prefill = FakePrefill(output_ids[0], cached=kwargs.pop("cached", 0))
    decode = FakeDecode(chunked(output_ids[1:]), **decode_options)
    return cluster(tokenizer, [prefill], [decode], **kwargs)


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


async def drain(call) -> list:
    return [message async for message in call]


async def read_rest(call) -> list:
    """The rest of a stream already read with `call.read()` (grpc forbids mixing that with iteration)."""
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


async def eventually(predicate, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- streaming ---------------------------------------------------------------------------------


def test_stream_carries_the_workers_tokens_and_text_reassembles(tokenizer, output_ids, monkeypatch):
    detokenize_calls = []
    real_detokenize = TokenizerServicer.Detokenize

    async def counting_detokenize(self, request, context):
        detokenize_calls.append(list(request.token_ids))
        return await real_detokenize(self, request, context)

    monkeypatch.setattr(TokenizerServicer, "Detokenize", counting_detokenize)

    async def body():
        async with simple_cluster(tokenizer, output_ids, cached=3) as c:
            params = SamplingParams(max_tokens=len(output_ids))
            messages = [m async for m in c.client.generate(PROMPT, params=params, request_id="r1")]
            prompt_ids = tokenizer.encode(PROMPT)

            assert [t for m in messages for t in m.token_ids] == output_ids
            assert "".join(m.text for m in messages) == tokenizer.decode(output_ids)
            assert list(messages[0].prompt_token_ids) == prompt_ids
            assert all(not m.prompt_token_ids for m in messages[1:])
            assert all(m.request_id == "r1" for m in messages)
            assert [m.finish_reason for m in messages[:-1]] == [0] * (len(messages) - 1)
            last = messages[-1]
            assert last.finish_reason == LENGTH
            assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_tokens) == (
                len(prompt_ids), len(output_ids), 3
            )
            assert 0 < last.timing.ttft_s <= last.timing.e2e_s and last.timing.queue_s >= 0
            assert [lp.logprob for m in messages for lp in m.logprobs] == pytest.approx(
                [-0.5] + [-0.25] * (len(output_ids) - 1)
            )
            # One Detokenize per step (first token + each TokenEvent), each sending only a small window.
            assert len(detokenize_calls) == 1 + len(c.decodes[0].chunks)
            assert max(len(ids) for ids in detokenize_calls) <= 12

            # What each stage was told.
            [prefill_request] = c.prefills[0].requests
            reserve = c.decodes[0].reserved["r1"]
            [attach] = c.decodes[0].attached
            assert list(prefill_request.prompt_token_ids) == prompt_ids == list(attach.prompt_token_ids)
            assert reserve.num_tokens == len(prompt_ids)
            assert prefill_request.decode_target.address == c.decode_handles[0].address
            assert prefill_request.decode_target.kv.reservation_id == attach.reservation_id == "res-r1"
            assert attach.first_token.token_id == output_ids[0] and attach.num_cached_tokens == 3
            assert prefill_request.sampling_params.max_tokens == len(output_ids)
            assert c.decodes[0].cancelled == [] and c.prefills[0].cancelled == []

    run(body)


def test_complete_and_json_match_the_local_shape(tokenizer, output_ids):
    async def body():
        async with simple_cluster(tokenizer, output_ids) as c:
            reply = await c.client.complete(PROMPT, params=SamplingParams(max_tokens=64))
            assert list(reply.token_ids) == output_ids
            assert reply.text == tokenizer.decode(output_ids)
            assert list(reply.prompt_token_ids) == tokenizer.encode(PROMPT)
            assert len(reply.request_id) == 32  # the gateway assigned a uuid

            as_json = Generation.from_complete(reply).to_json()
            assert set(as_json) == {
                "request_id", "prompt_token_ids", "token_ids", "text", "finish_reason", "logprobs", "usage", "timing"
            }
            assert as_json["finish_reason"] == "length" and len(as_json["logprobs"]) == len(output_ids)
            assert set(as_json["usage"]) == {"prompt_tokens", "completion_tokens", "cached_tokens"}
            assert set(as_json["timing"]) == {"ttft_s", "e2e_s"}

    run(body)


def test_chat_and_token_id_prompts(tokenizer, output_ids):
    async def body():
        async with simple_cluster(tokenizer, output_ids) as c:
            chat = [{"role": "user", "content": PROMPT}]
            reply = await c.client.complete(chat=chat)
            expected = tokenizer.encode(tokenizer.apply_chat_template(chat))
            assert list(reply.prompt_token_ids) == expected
            reply = await c.client.complete(prompt_token_ids=[5, 6, 7])
            assert list(reply.prompt_token_ids) == [5, 6, 7]
            assert list(c.prefills[0].requests[-1].prompt_token_ids) == [5, 6, 7]

    run(body)


def test_first_token_that_finishes_frees_the_reservation(tokenizer, output_ids):
    async def body():
        prefill = FakePrefill(output_ids[0], finish_reason=STOP)
        decode = FakeDecode(chunked(output_ids[1:]))
        async with cluster(tokenizer, [prefill], [decode]) as c:
            messages = await drain(c.client.generate(PROMPT, request_id="one"))
            assert len(messages) == 1 and messages[0].finish_reason == STOP
            assert list(messages[0].token_ids) == output_ids[:1]
            assert messages[0].usage.completion_tokens == 1
            assert decode.attached == [] and decode.cancelled == ["one"]

    run(body)


def test_reserve_offers_decode_what_the_chosen_prefill_can_send(tokenizer, output_ids):
    async def body():
        async with simple_cluster(tokenizer, output_ids) as c:
            await asyncio.sleep(0.3)  # a few Stats polls: the gateway has learnt the prefill's transports
            await drain(c.client.generate(PROMPT, request_id="t"))
            reserve = c.decodes[0].reserved["t"]
            assert list(reserve.transports) == ["cuda-ipc", "nccl", "host"]
            assert reserve.peer_host_id == "host-a" and reserve.peer_id == c.gateway.gateway.config.prefill_addresses[0]

    run(body)


# ---- stop strings --------------------------------------------------------------------------------


def test_stop_string_truncates_and_cancels_decode(tokenizer, output_ids):
    async def body():
        async with simple_cluster(tokenizer, output_ids, delay_s=0.02) as c:
            params = SamplingParams(max_tokens=64, stop=("lazy", "never appears"))
            messages = await drain(c.client.generate(PROMPT, params=params, request_id="s1"))
            text = "".join(m.text for m in messages)
            full = tokenizer.decode(output_ids)
            assert text == full[: full.index("lazy")]
            assert messages[-1].finish_reason == STOP
            assert len([t for m in messages for t in m.token_ids]) < len(output_ids)
            decode = c.decodes[0]
            assert decode.cancelled == ["s1"]
            await eventually(lambda: decode.attach_cancelled)

    run(body)


def test_text_that_could_begin_a_stop_string_is_held_back_not_lost(tokenizer, output_ids):
    async def body():
        async with simple_cluster(tokenizer, output_ids) as c:
            params = SamplingParams(max_tokens=64, stop=("lazy cat",))  # "lazy " matches a prefix, then diverges
            messages = await drain(c.client.generate(PROMPT, params=params))
            assert "".join(m.text for m in messages) == tokenizer.decode(output_ids)
            assert messages[-1].finish_reason == LENGTH

    run(body)


# ---- cancellation and deadlines ------------------------------------------------------------------


def test_client_cancel_mid_stream_cancels_decode_and_prefill(tokenizer, output_ids):
    async def body():
        async with simple_cluster(tokenizer, output_ids * 20, delay_s=0.05) as c:
            call = c.stub.Generate(build_request(PROMPT, params=SamplingParams(max_tokens=500), request_id="c1"))
            await call.read()
            await call.read()
            call.cancel()
            decode, prefill = c.decodes[0], c.prefills[0]
            await eventually(lambda: "c1" in decode.cancelled and "c1" in prefill.cancelled)
            await eventually(lambda: decode.attach_cancelled)
            await eventually(lambda: c.gateway.gateway.admission.num_running == 0)
            # The gateway keeps serving.
            reply = await c.client.complete(PROMPT, params=SamplingParams(max_tokens=4))
            assert reply.finish_reason == LENGTH

    run(body)


def test_deadline_cancels_the_request_everywhere(tokenizer, output_ids):
    async def body():
        async with simple_cluster(tokenizer, output_ids * 20, delay_s=0.05) as c:
            start = time.monotonic()
            call = c.client.generate(PROMPT, params=SamplingParams(max_tokens=500), request_id="d1", timeout_s=0.4)
            error = await rpc_error(drain(call))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 2
            await eventually(lambda: "d1" in c.decodes[0].cancelled and "d1" in c.prefills[0].cancelled)

    run(body)


# ---- errors --------------------------------------------------------------------------------------


def test_invalid_arguments_name_the_field_and_the_server_keeps_serving(tokenizer, output_ids):
    async def body():
        async with simple_cluster(tokenizer, output_ids) as c:
            error = await rpc_error(c.client.complete(""))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("prompt")
            request = build_request(PROMPT)
            request.sampling_params.temperature = -1.0
            error = await rpc_error(drain(c.stub.Generate(request)))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details().startswith("sampling_params.temperature")
            request = build_request(PROMPT)
            request.sampling_params.top_p = 1.5
            error = await rpc_error(c.stub.Complete(request))
            assert error.details().startswith("sampling_params.top_p")
            error = await rpc_error(c.client.complete(prompt_token_ids=[]))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            error = await rpc_error(c.client.complete(PROMPT, model="no-such-model"))
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert c.prefills[0].requests == [] and c.decodes[0].reserved == {}
            reply = await c.client.complete(PROMPT, params=SamplingParams(max_tokens=64))
            assert list(reply.token_ids) == output_ids

    run(body)


def test_unavailable_fast_when_every_decode_worker_is_down(tokenizer, output_ids):
    async def body():
        dead = f"127.0.0.1:{free_port()}"
        prefill = FakePrefill(output_ids[0])
        async with cluster(tokenizer, [prefill], [], extra_decode_addresses=(dead,)) as c:
            start = time.monotonic()
            error = await rpc_error(c.client.complete(PROMPT))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "decode" in error.details()
            assert time.monotonic() - start < 2
            assert prefill.requests == []

    run(body)


def test_decode_worker_that_dies_leaves_rotation_and_returns(tokenizer, output_ids):
    async def body():
        async with simple_cluster(tokenizer, output_ids) as c:
            assert (await c.client.complete(PROMPT)).finish_reason == LENGTH
            port = c.decode_handles[0].port
            await c.decode_handles[0].stop(grace=0)
            for _ in range(2):  # the first finds it down by the failed call, the second by rotation
                start = time.monotonic()
                error = await rpc_error(c.client.complete(PROMPT))
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - start < 2
            c.handles.append(await serve_fake(c.decodes[0], port=port))
            await eventually(lambda: c.gateway.gateway.router.decodes.workers[0].available, timeout_s=5)
            assert (await c.client.complete(PROMPT)).finish_reason == LENGTH

    run(body)


def test_resource_exhausted_beyond_the_queue(tokenizer, output_ids):
    async def body():
        async with simple_cluster(tokenizer, output_ids, max_running_requests=1, max_queue_requests=1) as c:
            gate = c.decodes[0].gate = asyncio.Event()
            running = c.stub.Generate(build_request(PROMPT))
            await running.read()  # the first token arrived: it holds the one running slot
            queued = asyncio.ensure_future(c.client.complete(PROMPT, params=SamplingParams(max_tokens=64)))
            await eventually(lambda: c.gateway.gateway.admission.num_waiting == 1)
            error = await rpc_error(c.client.complete(PROMPT))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            gate.set()
            rest = await read_rest(running)
            assert rest[-1].finish_reason == LENGTH
            reply = await queued
            assert list(reply.token_ids) == output_ids and reply.timing.queue_s > 0

    run(body)


# ---- routing -------------------------------------------------------------------------------------


def test_decode_with_most_free_blocks_wins_and_full_ones_are_skipped(tokenizer, output_ids):
    async def body():
        small = FakeDecode(chunked(output_ids[1:]), free_blocks=10)
        large = FakeDecode(chunked(output_ids[1:]), free_blocks=100)
        async with cluster(tokenizer, [FakePrefill(output_ids[0])], [small, large]) as c:
            await c.client.complete(PROMPT, request_id="a")
            assert "a" in large.reserved and "a" not in small.reserved
            large.full = True
            await c.client.complete(PROMPT, request_id="b")  # RESOURCE_EXHAUSTED on large: fails over
            assert "b" in small.reserved
            small.full = True
            error = await rpc_error(c.client.complete(PROMPT, request_id="c"))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(body)


def test_list_models(tokenizer, output_ids):
    async def body():
        async with simple_cluster(tokenizer, output_ids, model="tiny", max_model_len=2048, vocab_size=49152) as c:
            [model] = await c.client.list_models()
            assert (model.id, model.max_model_len, model.vocab_size) == ("tiny", 2048, 49152)
            assert (await c.client.complete(PROMPT, model="tiny")).finish_reason == LENGTH

    run(body)


def test_prefill_worker_that_dies_costs_no_request(tokenizer, output_ids):
    async def body():
        prefills = [FakePrefill(output_ids[0]), FakePrefill(output_ids[0])]
        async with cluster(tokenizer, prefills, [FakeDecode(chunked(output_ids[1:]))]) as c:
            await c.handles[1].stop(grace=0)  # the first prefill worker
            for _ in range(3):
                assert (await c.client.complete(PROMPT)).finish_reason == LENGTH
            assert len(prefills[1].requests) == 3
            assert not c.gateway.gateway.router.prefills.workers[0].available

    run(body)


# ---- the routing policy on its own -----------------------------------------------------------------


def pool_of(key, *workers: Worker) -> WorkerPool:
    async def probe(worker, timeout_s):
        return None

    return WorkerPool("decode", workers, key, probe)


def test_pool_prefers_headroom_then_load_and_round_robins_ties():
    a, b, c = Worker("a", None), Worker("b", None), Worker("c", None)
    a.free_blocks, b.free_blocks, c.free_blocks = 50, 80, 80
    pool = pool_of(most_kv_headroom, a, b, c)
    assert {pool.choose().address for _ in range(4)} == {"b", "c"}  # equal: alternate
    c.pending_blocks = 40  # reserved through us since the last poll
    assert pool.choose() is b
    b.in_flight, c.pending_blocks = 2, 0
    assert pool.choose() is c
    assert pool.choose(exclude=[c]) is b


def test_requests_arriving_together_spread_over_decode_replicas(tokenizer, output_ids):
    """Reservations still in flight count against a replica's headroom: 8 requests at once do not all go
    to the replica the last poll favoured by one block."""

    async def body():
        decodes = [FakeDecode(chunked(output_ids[1:]), free_blocks=65), FakeDecode(chunked(output_ids[1:]), free_blocks=64)]
        for decode in decodes:
            decode.reserve_delay_s = 0.2  # every request picks before any reservation returns
        async with cluster(tokenizer, [FakePrefill(output_ids[0])], decodes, stats_poll_interval_s=5.0) as c:
            await eventually(lambda: all(w.block_size for w in c.gateway.gateway.router.decodes.workers))
            await asyncio.gather(*(drain(c.client.generate(PROMPT, request_id=f"r{i}")) for i in range(8)))
            assert sorted(len(d.reserved) for d in decodes) == [4, 4]

    run(body)


def test_pool_prefers_fewest_in_flight_and_skips_workers_out_of_rotation():
    a, b = Worker("a", None), Worker("b", None)
    pool = pool_of(least_in_flight, a, b)
    with pool.track(a):
        assert pool.choose() is b
    pool.mark_down(b, "UNAVAILABLE: gone")
    assert pool.choose() is a
    pool.mark_down(a, "UNAVAILABLE: gone too")
    start = time.monotonic()
    with pytest.raises(UnavailableError, match="no decode worker is available.*gone too"):
        pool.choose()
    assert time.monotonic() - start < 0.01
    pool.mark_up(b)
    assert pool.choose() is b and b.last_error == ""


def test_a_worker_leaves_rotation_after_probe_misses_in_a_row_or_at_once_when_refused():
    """One late answer is a miss, not a loss: the only worker of a role stays in rotation and its streams keep
    going until `misses` probes in a row time out; a refused connection takes it out at once."""
    answers: list[grpc.StatusCode | None] = []

    async def probe(worker, timeout_s):
        code = answers.pop(0)
        if code is not None:
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="probe")

    worker = Worker("a", None)
    lost: list[str] = []
    worker.on_lost.add(lost.append)
    pool = WorkerPool("prefill", [worker], least_in_flight, probe)

    async def poll(*codes):
        for code in codes:
            answers.append(code)
            await pool.probe_all(0.1, misses=3)

    late, refused = grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE
    asyncio.run(poll(late, late, None, late, late))  # an answer in between starts the count again
    assert worker.available and pool.choose() is worker and not lost
    asyncio.run(poll(late))  # the third in a row
    assert not worker.available and len(lost) == 1 and "DEADLINE_EXCEEDED" in worker.last_error
    asyncio.run(poll(None))
    assert worker.available and worker.probe_misses == 0
    asyncio.run(poll(refused))
    assert not worker.available and len(lost) == 2


# ---- the CLI's client commands -------------------------------------------------------------------


def test_generate_json_and_chat_repl_through_the_gateway(tokenizer, output_ids, capsys):
    async def body():
        async with simple_cluster(tokenizer, output_ids) as c:
            args = argparse.Namespace(
                target=c.gateway.address, prompt=PROMPT, chat=False, json=True, model=None, timeout=5.0
            )
            assert await commands._generate(args, SamplingParams(max_tokens=64, temperature=0.0)) == 0
            printed = json.loads(capsys.readouterr().out)
            assert printed["token_ids"] == output_ids and printed["finish_reason"] == "length"
            assert printed["prompt_token_ids"] == tokenizer.encode(PROMPT)
            assert printed["usage"]["completion_tokens"] == len(output_ids)

            stdin, stdout = io.StringIO("hello\n\nand then?\n/exit\nnever read\n"), io.StringIO()
            params = SamplingParams(max_tokens=64)
            assert await commands.chat_repl(c.gateway.address, params, "Be brief.", stdin=stdin, stdout=stdout) == 0
            reply = tokenizer.decode(output_ids)
            assert stdout.getvalue() == f"{reply}\n{reply}\n"
            conversation = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "and then?"},
            ]
            second = c.prefills[0].requests[-1]
            assert list(second.prompt_token_ids) == tokenizer.encode(tokenizer.apply_chat_template(conversation))
            assert len(c.prefills[0].requests) == 3

    run(body)
