"""ErrorInterceptor on handler shapes the generated services do not use yet: bidi streams and plain generators."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import grpc.aio
import pytest

from stageserve.common.errors import InvalidArgumentError, ModelLoadError, ResourceExhaustedError
from stageserve.common.interceptors import ErrorInterceptor, status_for
from stageserve.common.server import ServerConfig, create_server
from stageserve.v1 import tokenizer_pb2_grpc


async def bidi_echo(request_iterator, context):
    """Echo each message; b"bad" raises after the echoes so far went out."""
    async for message in request_iterator:
        if message == b"bad":
            raise InvalidArgumentError("message", "bad bytes")
        yield message


async def bidi_writer(request_iterator, context):
    async for message in request_iterator:
        await context.write(message)
    raise ModelLoadError("weights are missing")


def sync_generator(request, context):
    yield request
    raise ResourceExhaustedError("pool full", retry_after_s=3)


@contextlib.asynccontextmanager
async def raw_server():
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    handlers = {
        "Echo": grpc.stream_stream_rpc_method_handler(bidi_echo),
        "Writer": grpc.stream_stream_rpc_method_handler(bidi_writer),
        "SyncGen": grpc.unary_stream_rpc_method_handler(sync_generator),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Raw", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)


async def _drain(call) -> list[bytes]:
    received = []
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for message in call:
            received.append(message)
    return received


@pytest.mark.parametrize(
    ("method", "code", "details"),
    [
        ("Echo", grpc.StatusCode.INVALID_ARGUMENT, "message: bad bytes"),
        ("Writer", grpc.StatusCode.FAILED_PRECONDITION, "weights are missing"),
    ],
)
def test_bidi_stream_errors(method, code, details):
    async def body():
        async with raw_server() as channel:
            call = channel.stream_stream(f"/test.Raw/{method}")(iter([b"a", b"b", b"bad"]))
            received = await _drain(call)
            assert received[:2] == [b"a", b"b"]
            assert (await call.code(), await call.details()) == (code, details)

    asyncio.run(body())


def test_plain_generator_stream():
    async def body():
        async with raw_server() as channel:
            call = channel.unary_stream("/test.Raw/SyncGen")(b"x")
            assert await _drain(call) == [b"x"]
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("retry-after-s", "3") in tuple(await call.trailing_metadata())

    asyncio.run(body())


def test_status_for_plain_exceptions_is_internal():
    code, details, trailing = status_for(ValueError("a bug, not a bad request"))
    assert (code, details, trailing) == (grpc.StatusCode.INTERNAL, "internal error", ())


def test_busy_port_is_an_invalid_argument():
    class Tokenizer(tokenizer_pb2_grpc.TokenizerServicer):
        pass

    async def body():
        first = await create_server(ServerConfig(), [Tokenizer()])
        try:
            with pytest.raises(InvalidArgumentError) as info:
                await create_server(ServerConfig(port=first.port), [Tokenizer()])
            assert info.value.field == "port"
        finally:
            await first.stop(grace=0)

    asyncio.run(body())
