"""The server factory on a real grpc.aio server on port 0: error mapping, health, reflection, size cap, stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from stageserve.common.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from stageserve.common.server import ServerConfig, ServerHandle, create_server, service_name
from stageserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FakeTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    """Tokenizes to code points; special inputs raise, to exercise the interceptor."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def Tokenize(self, request, context):
        match request.text:
            case "bad":
                raise InvalidArgumentError("text", "must not be 'bad'")
            case "busy":
                raise ResourceExhaustedError("queue is full", retry_after_s=2.5)
            case "missing":
                raise NotFoundError("model 'nope' is not served")
            case "boom":
                raise RuntimeError("secret internal detail")
            case "abort":
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler aborted")
            case "slow":
                await self.release.wait()
        return tokenizer_pb2.TokenizeResponse(token_ids=[ord(c) for c in request.text])

    def ApplyChatTemplate(self, request, context):  # a plain function, not a coroutine
        if not request.messages:
            raise InvalidArgumentError("messages", "must not be empty")
        return tokenizer_pb2.ApplyChatTemplateResponse(prompt="".join(m.content for m in request.messages))

    # Detokenize is left to the generated base class, which raises NotImplementedError.


class FakeDecode(decode_pb2_grpc.DecodeServicer):
    """Attach streams two tokens, then fails as the request id asks; PushKV counts chunks."""

    async def Attach(self, request, context):
        for token_id in (1, 2):
            yield decode_pb2.TokenEvent(tokens=[common_pb2.SampledToken(token_id=token_id)])
        if request.request_id == "busy":
            raise ResourceExhaustedError("no blocks", retry_after_s=0.5)
        if request.request_id == "boom":
            raise ZeroDivisionError("secret")
        yield decode_pb2.TokenEvent(finish_reason=common_pb2.FINISH_REASON_STOP)

    async def PushKV(self, request_iterator, context):
        count = 0
        async for chunk in request_iterator:
            if chunk.dtype == common_pb2.DTYPE_UNSPECIFIED:
                raise InvalidArgumentError("dtype", "must be set")
            count += 1
        return decode_pb2.PushKVResponse(num_chunks=count)


class WriterDecode(decode_pb2_grpc.DecodeServicer):
    """Attach written with `context.write` instead of yield."""

    async def Attach(self, request, context):
        await context.write(decode_pb2.TokenEvent(tokens=[common_pb2.SampledToken(token_id=7)]))
        raise InvalidArgumentError("reservation_id", "unknown reservation")


@contextlib.asynccontextmanager
async def serving(*servicers, **config) -> AsyncIterator[tuple[ServerHandle, grpc.aio.Channel]]:
    handle = await create_server(ServerConfig(**config), list(servicers))
    try:
        async with grpc.aio.insecure_channel(handle.address) as channel:
            yield handle, channel
    finally:
        await handle.stop(grace=0)


async def _rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def test_binds_a_free_port_and_names_services():
    async def body():
        async with serving(FakeTokenizer()) as (handle, _):
            assert handle.port > 0
            assert handle.address == f"127.0.0.1:{handle.port}"
            assert handle.service_names == ("stageserve.v1.Tokenizer",)
            assert service_name(FakeDecode()) == "stageserve.v1.Decode"

    asyncio.run(body())


def test_create_server_rejects_a_non_generated_servicer():
    with pytest.raises(TypeError, match="generated"):
        asyncio.run(create_server(ServerConfig(), [object()]))


@pytest.mark.parametrize(
    ("text", "code", "details"),
    [
        ("bad", grpc.StatusCode.INVALID_ARGUMENT, "text: must not be 'bad'"),
        ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full"),
        ("missing", grpc.StatusCode.NOT_FOUND, "model 'nope' is not served"),
        ("abort", grpc.StatusCode.PERMISSION_DENIED, "handler aborted"),
    ],
)
def test_unary_errors_map_to_status_codes(text, code, details):
    async def body():
        async with serving(FakeTokenizer()) as (_, channel):
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            err = await _rpc_error(stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=text)))
            assert err.code() == code
            assert err.details() == details
            trailing = dict(tuple(err.trailing_metadata()))
            assert trailing.get("retry-after-s") == ("2.5" if text == "busy" else None)

    asyncio.run(body())


def test_unexpected_errors_are_internal_without_leaking(caplog):
    async def body():
        async with serving(FakeTokenizer()) as (_, channel):
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            err = await _rpc_error(stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="boom")))
            assert err.code() == grpc.StatusCode.INTERNAL
            assert "secret" not in err.details() and "Traceback" not in err.details()
            assert "error id" in err.details()
            return err.details()

    details = asyncio.run(body())
    error_id = details.split("error id ")[1].split(";")[0]
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback stays in the server log


def test_plain_function_handler_and_unimplemented():
    async def body():
        async with serving(FakeTokenizer()) as (_, channel):
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            messages = [common_pb2.ChatMessage(role="user", content="hi")]
            reply = await stub.ApplyChatTemplate(tokenizer_pb2.ApplyChatTemplateRequest(messages=messages))
            assert reply.prompt == "hi"
            err = await _rpc_error(stub.ApplyChatTemplate(tokenizer_pb2.ApplyChatTemplateRequest()))
            assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "messages: must not be empty")
            err = await _rpc_error(stub.Detokenize(tokenizer_pb2.DetokenizeRequest()))
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED

    asyncio.run(body())


@pytest.mark.parametrize(
    ("request_id", "code"),
    [("ok", grpc.StatusCode.OK), ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED), ("boom", grpc.StatusCode.INTERNAL)],
)
def test_server_streaming_errors_after_partial_output(request_id, code):
    async def body():
        async with serving(FakeDecode()) as (_, channel):
            call = decode_pb2_grpc.DecodeStub(channel).Attach(decode_pb2.AttachRequest(request_id=request_id))
            received = []
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for event in call:
                    received.append(event)
            assert [e.tokens[0].token_id for e in received[:2]] == [1, 2]
            assert await call.code() == code
            if request_id == "busy":
                assert ("retry-after-s", "0.5") in tuple(await call.trailing_metadata())
            if request_id == "boom":
                assert "secret" not in await call.details()

    asyncio.run(body())


def test_server_streaming_with_context_write():
    async def body():
        async with serving(WriterDecode()) as (_, channel):
            call = decode_pb2_grpc.DecodeStub(channel).Attach(decode_pb2.AttachRequest())
            first = await call.read()
            assert first.tokens[0].token_id == 7
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (await call.details()).startswith("reservation_id:")

    asyncio.run(body())


def test_client_streaming_errors():
    async def body():
        async with serving(FakeDecode()) as (_, channel):
            stub = decode_pb2_grpc.DecodeStub(channel)
            good = [common_pb2.KVChunk(dtype=common_pb2.DTYPE_FLOAT32, chunk_index=i) for i in range(3)]
            assert (await stub.PushKV(iter(good))).num_chunks == 3
            err = await _rpc_error(stub.PushKV(iter([*good, common_pb2.KVChunk()])))
            assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "dtype: must be set")

    asyncio.run(body())


def test_health_liveness_and_readiness():
    async def body():
        async with serving(FakeTokenizer(), FakeDecode()) as (handle, channel):
            health = health_pb2_grpc.HealthStub(channel)

            async def status(name: str) -> int:
                return (await health.Check(health_pb2.HealthCheckRequest(service=name))).status

            assert await status("") == SERVING
            assert await status("stageserve.v1.Tokenizer") == NOT_SERVING
            await handle.set_ready(True)
            assert await status("stageserve.v1.Tokenizer") == SERVING
            assert await status("stageserve.v1.Decode") == SERVING
            await handle.set_ready(False)
            assert await status("stageserve.v1.Decode") == NOT_SERVING
            assert await status("") == SERVING
            err = await _rpc_error(health.Check(health_pb2.HealthCheckRequest(service="nope")))
            assert err.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(body())


def test_reflection_lists_and_describes_services():
    async def body():
        async with serving(FakeTokenizer()) as (_, channel):
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="stageserve.v1.Tokenizer"),
            ]
            replies = [r async for r in stub.ServerReflectionInfo(iter(requests))]
            names = {s.name for s in replies[0].list_services_response.service}
            assert {"stageserve.v1.Tokenizer", "grpc.health.v1.Health"} <= names
            assert replies[1].file_descriptor_response.file_descriptor_proto  # the descriptors are served

    asyncio.run(body())


def test_oversized_message_is_rejected():
    async def body():
        async with serving(FakeTokenizer(), max_receive_message_bytes=1024) as (_, channel):
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            assert len((await stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="x" * 500))).token_ids) == 500
            err = await _rpc_error(stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="x" * 4096)))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    asyncio.run(body())


def test_graceful_stop_drains_health_then_in_flight_rpcs():
    async def body():
        tokenizer = FakeTokenizer()
        handle = await create_server(ServerConfig(), [tokenizer])
        await handle.set_ready(True)
        async with grpc.aio.insecure_channel(handle.address) as channel:
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING
            in_flight = asyncio.ensure_future(stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="slow")))
            await asyncio.sleep(0.1)  # let the slow RPC reach the handler

            stopping = asyncio.ensure_future(handle.stop(grace=5.0))
            assert (await watch.read()).status == NOT_SERVING  # health fails before the server goes away
            watch.cancel()
            tokenizer.release.set()
            assert list((await in_flight).token_ids) == [ord(c) for c in "slow"]  # finished within grace
            await asyncio.wait_for(stopping, timeout=5.0)

            err = await _rpc_error(stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="late"), timeout=2.0))
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert await handle.wait_for_termination(timeout=1.0)

    asyncio.run(body())


def test_cancelling_a_wait_for_termination_keeps_the_graceful_stop():
    # Every service's `serve()` waits in `wait_for_termination()` and, when its task is cancelled (SIGTERM
    # in `stageserve serve`), calls `stop()`: the cancel must not cut the grace period short.
    async def body():
        tokenizer = FakeTokenizer()
        handle = await create_server(ServerConfig(), [tokenizer])
        await handle.set_ready(True)
        waiting = asyncio.ensure_future(handle.wait_for_termination())
        async with grpc.aio.insecure_channel(handle.address) as channel:
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            in_flight = asyncio.ensure_future(stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="slow")))
            await asyncio.sleep(0.1)  # let the slow RPC reach the handler
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting

            stopping = asyncio.ensure_future(handle.stop(grace=5.0))
            await asyncio.sleep(0.2)
            assert not stopping.done()  # still draining
            tokenizer.release.set()
            assert list((await in_flight).token_ids) == [ord(c) for c in "slow"]  # finished within grace
            await asyncio.wait_for(stopping, timeout=5.0)
        assert await handle.wait_for_termination(timeout=1.0)

    asyncio.run(body())
