"""The one error path: a server interceptor that turns exceptions into gRPC status codes.

Servicers and the core raise the exceptions of `stageserve.common.errors`; this interceptor maps them
at the boundary, for every RPC shape (unary or streaming, in and out; coroutines, async generators
and plain functions alike):

    InvalidArgumentError    -> INVALID_ARGUMENT    "field: message"
    ResourceExhaustedError  -> RESOURCE_EXHAUSTED  + trailing metadata `retry-after-s`
    NotFoundError           -> NOT_FOUND
    ModelLoadError          -> FAILED_PRECONDITION
    UnavailableError        -> UNAVAILABLE
    DeadlineExceededError   -> DEADLINE_EXCEEDED
    NotImplementedError     -> UNIMPLEMENTED
    anything else           -> INTERNAL, logged with its traceback under an error id that the
                               client sees; the traceback itself never leaves the server.

A handler that calls `context.abort(...)` itself is left alone, and cancellation passes through.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from stageserve.common.errors import (
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    ModelLoadError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

logger = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-s"

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status code, details and trailing metadata that `exc` maps to (INTERNAL for the unexpected)."""
    if isinstance(exc, InvalidArgumentError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), ()
    if isinstance(exc, ResourceExhaustedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), ((RETRY_AFTER_KEY, f"{exc.retry_after_s:g}"),)
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc), ()
    if isinstance(exc, ModelLoadError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc), ()
    if isinstance(exc, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(exc), ()
    if isinstance(exc, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), ()
    if isinstance(exc, DataLossError):
        return grpc.StatusCode.DATA_LOSS, str(exc), ()
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, "method not implemented", ()
    return grpc.StatusCode.INTERNAL, "internal error", ()


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    code, details, trailing = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        error_id = uuid.uuid4().hex[:12]
        logger.exception("%s failed (error id %s)", method, error_id, exc_info=exc)
        details = f"internal error (error id {error_id}; see the server log)"
    else:
        logger.debug("%s -> %s: %s", method, code.name, details)
    await context.abort(code, details, trailing_metadata=trailing)  # raises AbortError to end the RPC


async def _resolve(result: Any) -> Any:
    """Await a coroutine handler's result; a plain function's result is already there."""
    return await result if inspect.isawaitable(result) else result


def _wrap_unary_response(behavior: Behavior, method: str) -> Callable[..., Awaitable[Any]]:
    async def handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await _resolve(behavior(request_or_iterator, context))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # every other failure gets a status code; see _abort
            await _abort(context, method, exc)

    return handler


def _wrap_stream_response(behavior: Behavior, method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):
        # Stay an async generator, so grpc sends what it yields.
        async def generator_handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for response in behavior(request_or_iterator, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # see _abort
                await _abort(context, method, exc)

        return generator_handler

    # A coroutine that writes with `context.write`, or a plain function returning an iterable.
    async def writer_handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            result = await _resolve(behavior(request_or_iterator, context))
            if hasattr(result, "__aiter__"):
                async for response in result:
                    await context.write(response)
            elif result is not None:
                for response in result:
                    await context.write(response)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # see _abort
            await _abort(context, method, exc)

    return writer_handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Map exceptions raised by any handler to gRPC status codes (see the module docstring)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap(behavior: Behavior, streams_out: bool) -> Any:
            return (_wrap_stream_response if streams_out else _wrap_unary_response)(behavior, method)

        return rewrap(handler, wrap)


def rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior, bool], Any]) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s shape and codecs whose behavior is `wrap(behavior, streams_out)`."""
    codecs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), **codecs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), **codecs)
    return handler
