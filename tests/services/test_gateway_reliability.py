"""Gateway admission limits and worker-failure handling, against fake workers (test_gateway.py's) on port 0,
and the readiness watchdog of an engine-backed service.

- per-client limits and the queue's token bound refuse with RESOURCE_EXHAUSTED and a retry hint;
- a decode worker that fails mid-stream (UNAVAILABLE) or goes silent (its probes time out) ends its
  streams at once: with UNAVAILABLE, or (worker_retry=always) on another worker, re-prefilling the
  prompt plus the tokens already sent;
- a KV sender that goes away mid-transfer fails decode's Attach at once (UNAVAILABLE), and a prefill
  worker found gone before its KV landed ends the gateway's wait for it;
- a wedged engine step turns readiness NOT_SERVING, and SERVING again when the step ends.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_gateway import (  # noqa: F401 (output_ids is a fixture)
    LENGTH,
    output_ids,
    PROMPT,
    FakeDecode,
    FakePrefill,
    chunked,
    cluster,
    eventually,
    read_rest,
    rpc_error,
    run,
    simple_cluster,
)

from stageserve.common.server import ServerConfig
from stageserve.gateway.client import build_request
from stageserve.sample.params import SamplingParams


def client_metadata(name: str) -> tuple[tuple[str, str], ...]:
    return (("x-client-id", name),)


def test_one_client_over_its_limit_is_refused_with_a_retry_hint_and_others_are_not(tokenizer, output_ids):
    async def body():
        async with simple_cluster(tokenizer, output_ids, max_client_requests=1, retry_after_s=0.25) as c:
            gate = c.decodes[0].gate = asyncio.Event()
            held = c.stub.Generate(build_request(PROMPT), metadata=client_metadata("alice"))
            await held.read()  # alice's one request is in flight
            second = c.stub.Generate(build_request(PROMPT), metadata=client_metadata("alice"))
            error = await rpc_error(second.read())
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("retry-after-s", "0.25") in tuple(await second.trailing_metadata())
            bob = asyncio.ensure_future(c.stub.Complete(build_request(PROMPT), metadata=client_metadata("bob")))
            await eventually(lambda: c.gateway.gateway.admission.per_client.get("bob", 0) == 1)
            gate.set()
            assert (await bob).finish_reason == LENGTH
            await read_rest(held)
            assert c.gateway.gateway.admission.per_client == {}
            # alice's slot is back
            assert (await c.stub.Complete(build_request(PROMPT), metadata=client_metadata("alice"))).finish_reason == LENGTH

    run(body)


def test_the_queue_is_bounded_in_tokens(tokenizer, output_ids):
    prompt_bytes = len(PROMPT.encode())
    params = SamplingParams(max_tokens=50)

    async def body():
        # one request of (prompt bytes + 50) tokens fits in the queue, two do not
        limit = 2 * (prompt_bytes + 50) - 1
        async with simple_cluster(tokenizer, output_ids, max_running_requests=1, max_queue_tokens=limit) as c:
            gate = c.decodes[0].gate = asyncio.Event()
            running = c.stub.Generate(build_request(PROMPT))
            await running.read()
            queued = asyncio.ensure_future(c.client.complete(PROMPT, params=params))
            await eventually(lambda: c.gateway.gateway.admission.num_waiting == 1)
            assert c.gateway.gateway.admission.queued_tokens == prompt_bytes + 50
            error = await rpc_error(c.client.complete(PROMPT, params=params))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens" in error.details()
            gate.set()
            await read_rest(running)
            assert (await queued).finish_reason == LENGTH
            assert c.gateway.gateway.admission.queued_tokens == 0

    run(body)


class DyingDecode(FakeDecode):
    """Streams `events_before_death` events, then fails the stream with UNAVAILABLE, as a dying worker's
    connection does; every later call fails the same way."""

    def __init__(self, chunks, events_before_death: int = 2):
        super().__init__(chunks)
        self.events_before_death = events_before_death
        self.dead = False

    async def Attach(self, request, context):
        count = 0
        async for event in super().Attach(request, context):
            if count == self.events_before_death:
                self.dead = True
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            count += 1
            yield event

    async def Stats(self, request, context):
        if self.dead:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gone")
        return await super().Stats(request, context)


def dying_then_healthy(output_ids) -> tuple[FakePrefill, DyingDecode, FakeDecode]:
    return FakePrefill(output_ids[0]), DyingDecode(chunked(output_ids[1:])), FakeDecode(chunked(output_ids[1:]), free_blocks=1)


def test_a_decode_that_dies_mid_stream_fails_its_requests_fast_and_leaves_rotation(tokenizer, output_ids):
    async def body():
        prefill, dying, healthy = dying_then_healthy(output_ids)
        async with cluster(tokenizer, [prefill], [dying, healthy]) as c:  # the dying one has more headroom
            start = time.monotonic()
            error = await rpc_error(c.client.complete(PROMPT, params=SamplingParams(max_tokens=12)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - start < 2
            assert not c.gateway.gateway.router.decodes.workers[0].available
            reply = await c.client.complete(PROMPT, params=SamplingParams(max_tokens=12))  # on the survivor
            assert reply.finish_reason == LENGTH and list(reply.token_ids) == output_ids[:12]

    run(body)


def test_worker_retry_always_moves_a_stream_to_another_decode_with_the_tokens_so_far(tokenizer, output_ids):
    async def body():
        prefill, dying, healthy = dying_then_healthy(output_ids)
        async with cluster(tokenizer, [prefill], [dying, healthy], worker_retry="always") as c:
            reply = await c.client.complete(PROMPT, params=SamplingParams(max_tokens=12))
            assert reply.finish_reason == LENGTH and len(reply.token_ids) == 12
            prompt = list(reply.prompt_token_ids)
            first_attempt, retry = prefill.requests
            sent = list(reply.token_ids)
            kept = len(retry.prompt_token_ids) - len(prompt)  # tokens the client had when decode died
            assert kept > 1 and list(retry.prompt_token_ids) == prompt + sent[:kept]
            assert retry.sampling_params.max_tokens == 12 - kept
            [reserve] = healthy.reserved.values()
            assert reserve.num_tokens == len(prompt) + kept
            assert usage_ok(reply, len(prompt), 12)

    run(body)


def usage_ok(reply, prompt_tokens: int, completion_tokens: int) -> bool:
    return (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, completion_tokens)


class SilentDecode(FakeDecode):
    """Answers Reserve, then stops answering anything: Attach streams nothing, Stats never returns."""

    async def Attach(self, request, context):
        await asyncio.Event().wait()
        yield  # pragma: no cover

    async def Stats(self, request, context):
        if self.attached or self.reserved:
            await asyncio.Event().wait()
        return await super().Stats(request, context)


def test_a_silent_decode_is_found_by_its_probes_and_its_streams_end_at_once(tokenizer, output_ids):
    """stream_idle_timeout_s is 60 s, but the probes (0.3 s, three missed in a row) find the worker gone and cut
    its streams."""

    async def body():
        prefill = FakePrefill(output_ids[0])
        silent, healthy = SilentDecode(chunked(output_ids[1:])), FakeDecode(chunked(output_ids[1:]), free_blocks=1)
        async with cluster(tokenizer, [prefill], [silent, healthy], probe_timeout_s=0.3, stream_idle_timeout_s=60) as c:
            start = time.monotonic()
            error = await rpc_error(c.client.complete(PROMPT, params=SamplingParams(max_tokens=8)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - start < 2
            assert not c.gateway.gateway.router.decodes.workers[0].available

    run(body)


class PrefillThatDiesAfterAnswering(FakePrefill):
    """Returns the first token (its KV push would follow in the background), then is gone."""

    dead = False

    async def Prefill(self, request, context):
        reply = await super().Prefill(request, context)
        self.dead = True
        return reply

    async def Stats(self, request, context):
        if self.dead:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection refused")
        return await super().Stats(request, context)


class DecodeAwaitingKV(FakeDecode):
    """Attach waits for KV that never comes (up to decode's kv_wait_timeout_s, 30 s by default)."""

    async def Attach(self, request, context):
        self.attached.append(request)
        await asyncio.Event().wait()
        yield  # pragma: no cover


def test_a_prefill_lost_before_its_kv_landed_ends_the_wait_for_it_at_once(tokenizer, output_ids):
    async def body():
        prefill, decode = PrefillThatDiesAfterAnswering(output_ids[0]), DecodeAwaitingKV(chunked(output_ids[1:]))
        async with cluster(tokenizer, [prefill], [decode]) as c:
            start = time.monotonic()
            error = await rpc_error(c.client.complete(PROMPT, params=SamplingParams(max_tokens=8)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "prefill" in error.details()
            assert time.monotonic() - start < 2
            await eventually(lambda: len(decode.cancelled) == 1)  # the reservation was let go

    run(body)


def test_a_wedged_engine_step_turns_readiness_off_until_it_ends():
    from stageserve.decode.service import DecodeServiceConfig
    from stageserve.decode.service import start as start_decode
    from stageserve.engine.config import EngineConfig
    from stageserve.sample.params import SamplingParams as Params

    async def body():
        config = DecodeServiceConfig(
            model="dummy:tiny", engine=EngineConfig(num_blocks=16, device="cpu", dtype="float32"),
            step_timeout_s=0.3, watchdog_interval_s=0.05, server=ServerConfig(),
        )
        handle, worker = await start_decode(config)
        release = threading.Event()
        real_step = worker.engine.step

        def wedged_step():
            release.wait(10)  # a stuck kernel, a deadlock: the loop stops turning
            return real_step()

        try:
            async with grpc.aio.insecure_channel(handle.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)

                async def status(service: str):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    return reply.status

                SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
                assert await status("stageserve.v1.Decode") == SERVING
                worker.engine.step = wedged_step
                await worker.call(lambda e: e.add_request("wedge", [1, 2, 3], Params(max_tokens=2, ignore_eos=True)))
                deadline = time.monotonic() + 3
                while await status("stageserve.v1.Decode") != NOT_SERVING:
                    assert time.monotonic() < deadline, "the watchdog never turned readiness off"
                    await asyncio.sleep(0.05)
                assert await status("") == SERVING  # liveness is separate
                release.set()
                deadline = time.monotonic() + 3
                while await status("stageserve.v1.Decode") != SERVING:
                    assert time.monotonic() < deadline, "readiness did not come back"
                    await asyncio.sleep(0.05)
        finally:
            release.set()
            await handle.stop(grace=0)
            await worker.stop()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_a_kv_sender_that_goes_away_mid_transfer_fails_the_attach_at_once():
    """Prefill pushes part of the KV, then its stream breaks (the process died): decode's Attach fails
    UNAVAILABLE (retryable) at once instead of waiting kv_wait_timeout_s, and the blocks are freed."""
    import zlib

    from stageserve.decode.service import DecodeServiceConfig
    from stageserve.decode.service import start as start_decode
    from stageserve.engine.config import EngineConfig
    from stageserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

    async def body():
        config = DecodeServiceConfig(
            model="dummy:tiny", engine=EngineConfig(num_blocks=16, device="cpu", dtype="float32"), kv_wait_timeout_s=30,
        )
        handle, worker = await start_decode(config)
        try:
            async with grpc.aio.insecure_channel(handle.address) as channel:
                decode = decode_pb2_grpc.DecodeStub(channel)
                reserved = (await decode.Reserve(decode_pb2.ReserveRequest(request_id="r", num_tokens=5), timeout=5)).descriptor
                layout, n = reserved.layout, len(reserved.block_ids)
                data = bytes(4 * 2 * n * layout.block_size * layout.num_kv_heads * layout.head_dim)
                first_layer = common_pb2.KVChunk(
                    reservation_id=reserved.reservation_id, layer_index=0, block_ids=reserved.block_ids,
                    dtype=layout.dtype, shape=[2, n, layout.block_size, layout.num_kv_heads, layout.head_dim],
                    data=data, crc32=zlib.crc32(data), chunk_index=0, final=False,
                )
                sent = asyncio.Event()

                async def chunks():
                    yield first_layer
                    sent.set()
                    await asyncio.Event().wait()  # the rest never comes

                push = decode.PushKV(chunks(), timeout=30)
                await sent.wait()
                await asyncio.sleep(0.2)  # decode has received and written layer 0
                push.cancel()  # the sender is gone
                start = time.monotonic()
                attach = decode.Attach(decode_pb2.AttachRequest(
                    request_id="r", reservation_id=reserved.reservation_id, prompt_token_ids=[1, 2, 3, 4, 5],
                    first_token=common_pb2.SampledToken(token_id=7),
                ), timeout=30)
                error = await rpc_error(attach.read())
                assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - start < 2
                await decode.Cancel(decode_pb2.DecodeCancelRequest(request_id="r"), timeout=5)
                pool = (await decode.Stats(decode_pb2.DecodeStatsRequest(), timeout=5)).pool
                assert (pool.free_blocks, pool.reserved_blocks) == (pool.total_blocks, 0)
        finally:
            await handle.stop(grace=0)
            await worker.stop()

    asyncio.run(asyncio.wait_for(body(), 60))
