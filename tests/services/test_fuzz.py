"""Fuzzing the request messages of every service against real in-process servers.

Hypothesis draws field values, valid and invalid, for Tokenizer, Sample, Draft (Propose, ProposeBatch,
Accept, Release), Decode (Reserve, PushKV chunks, Attach, Cancel) and Gateway (GenerateRequest). Every
call must end OK or with a typed status a client can act on (never INTERNAL or UNKNOWN), within its
timeout, and a normal request must still succeed afterwards with both KV pools back to idle.

The servers run on an event loop in a background thread; the tests call them with blocking stubs.
The examples are derandomized, so CI sees the same inputs on every run.
"""

from __future__ import annotations

import asyncio
import threading
import zlib

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stageserve.common.convert import sampling_params_to_pb
from stageserve.common.server import ServerConfig
from stageserve.decode.service import DecodeServiceConfig
from stageserve.decode.service import start as start_decode
from stageserve.draft.service import DraftServiceConfig
from stageserve.draft.service import start as start_draft
from stageserve.engine.worker import EngineWorker
from stageserve.gateway.config import GatewayServiceConfig
from stageserve.gateway.service import start as start_gateway
from stageserve.prefill.service import PrefillServiceConfig
from stageserve.prefill.service import start as start_prefill
from stageserve.sample.params import SamplingParams
from stageserve.sample.service import SampleServiceConfig
from stageserve.sample.service import start as start_sample
from stageserve.tokenizer.service import TokenizerServiceConfig
from stageserve.tokenizer.service import start as start_tokenizer
from stageserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    draft_pb2,
    draft_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    sample_pb2,
    sample_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

pytestmark = pytest.mark.slow

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
}
TIMEOUT_S = 10.0  # of every fuzzed call: a hang shows up as DEADLINE_EXCEEDED at the client, flagged below
NUM_BLOCKS = 64
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


# ---- servers on a background event loop --------------------------------------------------------------


class Servers:
    """Every service on one event loop in a thread, with blocking stubs for the test thread."""

    def __init__(self, make_engine, tokenizer):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-servers", daemon=True)
        self.thread.start()
        self.handles: list = []
        self.workers: list[EngineWorker] = []
        self.run(self._start(make_engine, tokenizer))
        self.channels = {name: grpc.insecure_channel(h.address) for name, h in self.named.items()}
        self.tokenizer = tokenizer_pb2_grpc.TokenizerStub(self.channels["tokenizer"])
        self.sample = sample_pb2_grpc.SampleStub(self.channels["sample"])
        self.draft = draft_pb2_grpc.DraftStub(self.channels["draft"])
        self.prefill = prefill_pb2_grpc.PrefillStub(self.channels["prefill"])
        self.decode = decode_pb2_grpc.DecodeStub(self.channels["decode"])
        self.gateway = gateway_pb2_grpc.GatewayStub(self.channels["gateway"])

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, make_engine, tokenizer) -> None:
        server = ServerConfig(host="127.0.0.1", port=0)
        self.workers = [EngineWorker(make_engine(num_blocks=NUM_BLOCKS)) for _ in range(2)]
        for worker in self.workers:
            worker.start()
        self.named = {
            "tokenizer": await start_tokenizer(TokenizerServiceConfig(server=server), tokenizer),
            "sample": await start_sample(SampleServiceConfig(eos_token_id=tokenizer.eos_token_id, server=server)),
            "draft": await start_draft(DraftServiceConfig(server=server)),
            # Attach on a reservation whose KV never comes waits only 1 s.
            "decode": (await start_decode(DecodeServiceConfig(server=server, kv_wait_timeout_s=1.0), self.workers[1]))[0],
            "prefill": (await start_prefill(PrefillServiceConfig(server=server), self.workers[0]))[0],
        }
        self.named["gateway"] = await start_gateway(
            GatewayServiceConfig(
                tokenizer_addresses=(self.named["tokenizer"].address,),
                prefill_addresses=(self.named["prefill"].address,),
                decode_addresses=(self.named["decode"].address,),
                stats_poll_interval_s=0.1,
            )
        )

    async def _stop(self) -> None:
        for handle in reversed(list(self.named.values())):
            await handle.stop(grace=0)
        for worker in self.workers:
            await worker.stop()

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def pools(self) -> list[common_pb2.KVPoolStats]:
        return [
            self.prefill.Stats(prefill_pb2.PrefillStatsRequest(), timeout=TIMEOUT_S).pool,
            self.decode.Stats(decode_pb2.DecodeStatsRequest(), timeout=TIMEOUT_S).pool,
        ]

    def layout(self) -> common_pb2.KVLayout:
        reply = self.decode.Reserve(decode_pb2.ReserveRequest(request_id="layout-probe", num_tokens=1), timeout=TIMEOUT_S)
        self.decode.Cancel(decode_pb2.DecodeCancelRequest(request_id="layout-probe"), timeout=TIMEOUT_S)
        return reply.descriptor.layout


@pytest.fixture(scope="module")
def servers(make_engine, tokenizer):
    s = Servers(make_engine, tokenizer)
    yield s
    s.close()


def outcome(call) -> grpc.StatusCode:
    """Run `call()`; its status, which must be typed (the test fails on INTERNAL, UNKNOWN and the like)."""
    try:
        call()
    except grpc.RpcError as exc:
        code = exc.code()
        assert code in ALLOWED, f"{code.name}: {exc.details()}"
        event(code.name)  # --hypothesis-show-statistics shows how often each status came back
        return code
    event("OK")
    return grpc.StatusCode.OK


def assert_still_serving(servers: Servers) -> None:
    """A normal request completes through the gateway, and both pools end idle."""
    request = gateway_pb2.GenerateRequest(
        prompt="The capital of France is",
        sampling_params=sampling_params_to_pb(SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)),
    )
    reply = servers.gateway.Complete(request, timeout=30)
    assert len(reply.token_ids) == 4 and reply.finish_reason == common_pb2.FINISH_REASON_LENGTH
    import time

    deadline = time.monotonic() + 10
    while True:
        pools = servers.pools()
        idle = [(p.free_blocks, p.reserved_blocks, p.num_running, p.num_waiting) == (p.total_blocks, 0, 0, 0) for p in pools]
        if all(idle) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(idle), pools


# ---- strategies ---------------------------------------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
VOCAB = 49152
token_ids = st.lists(st.one_of(st.integers(0, VOCAB - 1), INT32), max_size=24)
small_text = st.text(max_size=40)
ids = st.one_of(st.just(""), st.text(max_size=12), st.text(min_size=250, max_size=300))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]))


@st.composite
def wild_sampling_params(draw) -> common_pb2.SamplingParams:
    """Any value in every field; max_tokens is either small (fast when valid) or far out of range."""
    pb = common_pb2.SamplingParams()
    if draw(st.booleans()):
        pb.max_tokens = draw(st.one_of(st.integers(0, 4), st.integers(100_000, 2**32 - 1)))
    for name in ("temperature", "top_p", "repetition_penalty"):
        if draw(st.booleans()):
            setattr(pb, name, draw(floats))
    pb.top_k = draw(st.one_of(st.just(0), INT32))
    pb.min_p = draw(st.one_of(st.just(0.0), floats))
    pb.frequency_penalty = draw(st.one_of(st.just(0.0), floats))
    pb.presence_penalty = draw(st.one_of(st.just(0.0), floats))
    if draw(st.booleans()):
        pb.seed = draw(UINT64)
    pb.stop_token_ids.extend(draw(st.lists(INT32, max_size=3)))
    pb.stop.extend(draw(st.lists(st.text(max_size=6), max_size=3)))
    pb.ignore_eos = draw(st.booleans())
    if draw(st.booleans()):
        pb.logprobs = draw(st.one_of(st.integers(0, 25), UINT32))
    pb.min_tokens = draw(st.one_of(st.integers(0, 4), UINT32))
    return pb


@st.composite
def valid_sampling_params(draw) -> common_pb2.SamplingParams:
    """In range in every field (and short: max_tokens <= 4)."""
    pb = common_pb2.SamplingParams(max_tokens=draw(st.integers(1, 4)))
    if draw(st.booleans()):
        pb.temperature = draw(st.floats(0, 2, width=32))
    pb.top_k = draw(st.integers(0, 100_000))
    if draw(st.booleans()):
        pb.top_p = draw(st.floats(0.125, 1, width=32))
    pb.min_p = draw(st.floats(0, 1, width=32))
    if draw(st.booleans()):
        pb.repetition_penalty = draw(st.floats(0.125, 3, width=32))
    pb.frequency_penalty = draw(st.floats(-2, 2, width=32))
    pb.presence_penalty = draw(st.floats(-2, 2, width=32))
    if draw(st.booleans()):
        pb.seed = draw(st.integers(0, 2**63 - 1))
    pb.stop_token_ids.extend(draw(st.lists(st.integers(0, 2**31 - 1), max_size=3)))
    pb.stop.extend(draw(st.lists(st.text(min_size=1, max_size=6), max_size=3)))
    pb.ignore_eos = draw(st.booleans())
    if draw(st.booleans()):
        pb.logprobs = draw(st.integers(0, 20))
    pb.min_tokens = draw(st.integers(0, pb.max_tokens))
    return pb


@st.composite
def sampling_params(draw) -> common_pb2.SamplingParams:
    """Valid, valid but for one field, or wild throughout."""
    kind = draw(st.sampled_from(["valid", "valid", "one bad field", "wild"]))
    if kind == "wild":
        return draw(wild_sampling_params())
    pb = draw(valid_sampling_params())
    if kind == "one bad field":
        wild = draw(wild_sampling_params())
        name = draw(st.sampled_from([f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields]))
        pb.ClearField(name)
        descriptor = wild.DESCRIPTOR.fields_by_name[name]
        if descriptor.is_repeated:
            getattr(pb, name).extend(getattr(wild, name))
        elif not descriptor.has_presence or wild.HasField(name):
            setattr(pb, name, getattr(wild, name))
    return pb


chat_messages = st.lists(
    st.builds(common_pb2.ChatMessage, role=st.one_of(st.sampled_from(["system", "user", "assistant"]), small_text),
              content=small_text),
    max_size=4,
)


# ---- tokenizer, sample, draft -------------------------------------------------------------------------


@FUZZ
@given(
    kind=st.sampled_from(["text", "chat", "none"]),
    text=st.text(max_size=200),
    chat=chat_messages,
    add_special=st.booleans(),
    detok_ids=token_ids,
    prefix=st.one_of(st.integers(0, 30), UINT32),
    read=st.one_of(st.integers(0, 30), UINT32),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_tokenizer_requests(servers, kind, text, chat, add_special, detok_ids, prefix, read, flags):
    request = tokenizer_pb2.TokenizeRequest(add_special_tokens=add_special)
    if kind == "text":
        request.text = text
    elif kind == "chat":
        request.chat.messages.extend(chat)
    outcome(lambda: servers.tokenizer.Tokenize(request, timeout=TIMEOUT_S))
    detok = tokenizer_pb2.DetokenizeRequest(
        token_ids=detok_ids, prefix_offset=prefix, read_offset=read, skip_special_tokens=flags[0], final=flags[1]
    )
    outcome(lambda: servers.tokenizer.Detokenize(detok, timeout=TIMEOUT_S))
    template = tokenizer_pb2.ApplyChatTemplateRequest(messages=chat, add_generation_prompt=flags[2])
    outcome(lambda: servers.tokenizer.ApplyChatTemplate(template, timeout=TIMEOUT_S))


@st.composite
def sample_rows(draw) -> list[sample_pb2.SampleRow]:
    rows = []
    for _ in range(draw(st.integers(0, 3))):
        vocab = draw(st.one_of(st.sampled_from([1, 8, 100]), st.sampled_from([1, 8, 100]), UINT32))
        honest = vocab <= 100 and draw(st.sampled_from([True, True, True, False]))
        logits = bytes(4 * vocab) if honest else draw(st.binary(max_size=64))
        history = st.lists(st.integers(0, min(vocab, 2**31) - 1) if honest and vocab else INT32, max_size=6)
        rows.append(
            sample_pb2.SampleRow(
                request_id=draw(ids), logits=logits, vocab_size=vocab, params=draw(sampling_params()),
                prompt_token_ids=draw(history), output_token_ids=draw(history),
            )
        )
    return rows


@FUZZ
@given(rows=sample_rows())
def test_sample_requests(servers, rows):
    outcome(lambda: servers.sample.Sample(sample_pb2.SampleRequest(rows=rows), timeout=TIMEOUT_S))


@FUZZ
@given(
    seq_id=st.one_of(st.sampled_from(["s0", "s1"]), ids),
    new_ids=token_ids,
    k=st.one_of(st.integers(0, 8), UINT32),
    accepted=st.one_of(st.integers(0, 8), UINT32),
)
def test_draft_requests(servers, seq_id, new_ids, k, accepted):
    outcome(lambda: servers.draft.Propose(draft_pb2.ProposeRequest(seq_id=seq_id, new_token_ids=new_ids, k=k), timeout=TIMEOUT_S))
    outcome(lambda: servers.draft.Accept(draft_pb2.AcceptRequest(seq_id=seq_id, num_accepted=accepted), timeout=TIMEOUT_S))
    outcome(lambda: servers.draft.Release(draft_pb2.ReleaseRequest(seq_id=seq_id), timeout=TIMEOUT_S))


@st.composite
def propose_items(draw) -> list[draft_pb2.ProposeRequest]:
    """A few items over a small set of ids (so repeats and known sequences turn up), or far too many."""
    if draw(st.integers(0, 19)) == 0:
        return [draft_pb2.ProposeRequest(seq_id=f"m{i}", new_token_ids=[1], k=1, reset=True) for i in range(300)]
    items = []
    for _ in range(draw(st.integers(0, 5))):
        pb = draft_pb2.ProposeRequest(
            seq_id=draw(st.one_of(st.sampled_from(["s0", "s1", "s2", "s3"]), ids)), new_token_ids=draw(token_ids),
            k=draw(st.one_of(st.integers(0, 8), UINT32)), reset=draw(st.booleans()),
        )  # fmt: skip
        if draw(st.booleans()):
            pb.num_accepted = draw(st.one_of(st.integers(0, 8), UINT32))
        items.append(pb)
    return items


@FUZZ
@given(items=propose_items())
def test_draft_batch_requests(servers, items):
    replies = []
    code = outcome(lambda: replies.append(servers.draft.ProposeBatch(draft_pb2.ProposeBatchRequest(items=items), timeout=TIMEOUT_S)))
    if code == grpc.StatusCode.OK:  # one typed result per item, in order, whatever the others held
        (reply,) = replies
        assert len(reply.results) == len(items)
        for item, result in zip(items, reply.results):
            assert result.status in (draft_pb2.PROPOSE_STATUS_OK, draft_pb2.PROPOSE_STATUS_INVALID_ARGUMENT,
                                     draft_pb2.PROPOSE_STATUS_NOT_FOUND)  # fmt: skip
            assert len(result.token_ids) <= (item.k if result.status == draft_pb2.PROPOSE_STATUS_OK else 0)
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT


# ---- decode ---------------------------------------------------------------------------------------------


@FUZZ
@given(
    request_id=ids,
    num_tokens=st.one_of(st.integers(0, 64), UINT32),
    params=sampling_params(),
    transports=st.lists(st.one_of(st.just("host"), small_text), max_size=2),
    peer=small_text,
)
def test_decode_reserve_and_cancel(servers, request_id, num_tokens, params, transports, peer):
    request = decode_pb2.ReserveRequest(
        request_id=request_id, num_tokens=num_tokens, sampling_params=params, transports=transports, peer_id=peer
    )
    outcome(lambda: servers.decode.Reserve(request, timeout=TIMEOUT_S))
    outcome(lambda: servers.decode.Cancel(decode_pb2.DecodeCancelRequest(request_id=request_id), timeout=TIMEOUT_S))


def valid_chunks(layout: common_pb2.KVLayout, descriptor: common_pb2.KVTransferDescriptor) -> list[common_pb2.KVChunk]:
    """Every layer of every reserved block, one chunk per layer (zeros: the content is not checked)."""
    n = len(descriptor.block_ids)
    data = bytes(4 * 2 * n * layout.block_size * layout.num_kv_heads * layout.head_dim)
    return [
        common_pb2.KVChunk(
            reservation_id=descriptor.reservation_id, layer_index=layer, block_ids=descriptor.block_ids,
            dtype=layout.dtype, shape=[2, n, layout.block_size, layout.num_kv_heads, layout.head_dim], data=data,
            crc32=zlib.crc32(data), chunk_index=layer, final=layer == layout.num_layers - 1,
        )
        for layer in range(layout.num_layers)
    ]


@st.composite
def chunk_mutations(draw) -> list[tuple[int, str, object]]:
    """(chunk index, field, value) edits to a valid transfer."""
    fields = {
        "reservation_id": ids,
        "layer_index": st.one_of(st.integers(0, 40), UINT32),
        "block_ids": st.lists(st.one_of(st.integers(0, NUM_BLOCKS), INT32), max_size=4),
        "dtype": st.integers(0, 6),
        "shape": st.lists(st.one_of(st.integers(0, 80), UINT32), max_size=6),
        "data": st.binary(max_size=64),
        "crc32": UINT32,
        "chunk_index": st.one_of(st.integers(0, 40), UINT32),
        "final": st.booleans(),
        "drop": st.just(None),
    }
    return draw(st.lists(st.tuples(st.integers(0, 40), st.sampled_from(sorted(fields)), st.none()).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.just(t[1]), fields[t[1]])), max_size=3))


@FUZZ
@given(num_tokens=st.integers(1, 40), mutations=chunk_mutations(), truncate=st.one_of(st.none(), st.integers(0, 40)))
def test_decode_push_kv_chunks(servers, num_tokens, mutations, truncate):
    layout = servers.layout()
    reserved = servers.decode.Reserve(decode_pb2.ReserveRequest(request_id="push", num_tokens=num_tokens), timeout=TIMEOUT_S)
    try:
        chunks = valid_chunks(layout, reserved.descriptor)
        for index, name, value in mutations:
            chunk = chunks[index % len(chunks)]
            if name == "drop":
                chunks.remove(chunk)
            elif name in ("block_ids", "shape"):
                del getattr(chunk, name)[:]
                getattr(chunk, name).extend(value)
            else:
                setattr(chunk, name, value)
            if not chunks:
                break
        if truncate is not None:
            chunks = chunks[:truncate]
        outcome(lambda: servers.decode.PushKV(iter(chunks), timeout=TIMEOUT_S))
    finally:
        servers.decode.Cancel(decode_pb2.DecodeCancelRequest(request_id="push"), timeout=TIMEOUT_S)


@FUZZ
@given(
    land_kv=st.booleans(),
    use_reservation=st.sampled_from([True, True, True, False]),
    use_request_id=st.sampled_from([True, True, True, False]),
    request_id=ids,
    reservation_id=ids,
    first=st.one_of(st.integers(0, VOCAB - 1), st.integers(0, VOCAB - 1), INT32),
    prompt=st.one_of(st.none(), st.none(), token_ids),
    params=sampling_params(),
    cached=st.one_of(st.integers(0, 7), UINT32),
)
def test_decode_attach(servers, land_kv, use_reservation, use_request_id, request_id, reservation_id, first, prompt, params, cached):
    real_prompt = [1, 2, 3, 4, 5, 6, 7]
    reserve = decode_pb2.ReserveRequest(
        request_id="attach", num_tokens=len(real_prompt),
        sampling_params=sampling_params_to_pb(SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)),
    )
    reserved = servers.decode.Reserve(reserve, timeout=TIMEOUT_S)
    try:
        if land_kv:
            servers.decode.PushKV(iter(valid_chunks(servers.layout(), reserved.descriptor)), timeout=TIMEOUT_S)
        request = decode_pb2.AttachRequest(
            request_id="attach" if use_request_id else request_id,
            reservation_id=reserved.descriptor.reservation_id if use_reservation else reservation_id,
            first_token=common_pb2.SampledToken(token_id=first),
            prompt_token_ids=real_prompt if prompt is None else prompt,
            sampling_params=params,
            num_cached_tokens=cached,
        )
        outcome(lambda: list(servers.decode.Attach(request, timeout=TIMEOUT_S)))
    finally:
        servers.decode.Cancel(decode_pb2.DecodeCancelRequest(request_id="attach"), timeout=TIMEOUT_S)


# ---- gateway ----------------------------------------------------------------------------------------------


@st.composite
def generate_requests(draw) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(
        request_id=draw(st.one_of(st.just(""), st.just(""), ids)),
        model=draw(st.sampled_from(["", "", "", "no-such-model"])),
        add_special_tokens=draw(st.booleans()),
        skip_special_tokens=draw(st.booleans()),
        cache_salt=draw(st.one_of(st.just(""), small_text)),
        sampling_params=draw(sampling_params()),
    )
    kind = draw(st.sampled_from(["prompt", "prompt", "chat", "prompt_token_ids", "prompt_token_ids", "none"]))
    if kind == "prompt":
        request.prompt = draw(st.text(min_size=draw(st.sampled_from([0, 1, 1])), max_size=100))
    elif kind == "chat":
        request.chat.messages.extend(draw(chat_messages))
    elif kind == "prompt_token_ids":
        request.prompt_token_ids.ids.extend(draw(st.one_of(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24), token_ids)))
    return request


@FUZZ
@given(request=generate_requests(), streaming=st.booleans())
def test_gateway_generate_requests(servers, request, streaming):
    if streaming:
        outcome(lambda: list(servers.gateway.Generate(request, timeout=TIMEOUT_S)))
    else:
        outcome(lambda: servers.gateway.Complete(request, timeout=TIMEOUT_S))


def test_every_service_still_serves_after_the_fuzzing(servers):
    """Runs last in this module: a normal request end to end, and no block left held anywhere."""
    assert_still_serving(servers)
