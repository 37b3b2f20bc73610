"""OpenTelemetry tracing for every stage: set-up from the standard OTEL_* variables, W3C traceparent
propagation through gRPC metadata, and spans that cost nothing when tracing is off.

    handle = configure("prefill")            # in `stageserve serve`: reads OTEL_EXPORTER_OTLP_ENDPOINT, ...
    with span("prefill.compute", {"stageserve.request_id": rid}) as s:
        s.set_attribute(...)
    await stub.Tokenize(pb, metadata=outgoing_metadata())
    handle.shutdown()                        # flushes the batch processor

Tracing is off, and every helper here is a no-op (the API's default no-op tracer, or a stand-in when
the opentelemetry packages are missing, as on the GPU image), unless an endpoint is given: by
`configure(endpoint=...)` or OTEL_EXPORTER_OTLP_ENDPOINT. Sampling follows OTEL_TRACES_SAMPLER /
OTEL_TRACES_SAMPLER_ARG (the SDK reads them; the default is parentbased_always_on).

The tracer provider is OpenTelemetry's process-wide one: the API keeps it, and the current span
travels in a contextvar, so nothing here holds state of its own.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from stageserve.common.interceptors import rewrap

logger = logging.getLogger(__name__)

INSTRUMENTATION = "stageserve"
# RPCs that run on a timer rather than for a request: tracing them would bury the requests.
UNTRACED_SUFFIXES = ("/Stats", "/Check", "/Watch", "/ServerReflectionInfo")

try:  # optional: the `tracing` extra
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - exercised on images without the extra
    trace = None


class _NoopSpan:
    """Stands in for a span when the opentelemetry API is not installed."""

    def set_attribute(self, key: str, value: Any) -> None: ...
    def set_attributes(self, attributes: Mapping[str, Any]) -> None: ...
    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None: ...
    def record_exception(self, exc: BaseException) -> None: ...
    def is_recording(self) -> bool:
        return False


_NOOP_SPAN = _NoopSpan()


@dataclass
class TracingHandle:
    """What `configure` set up; `shutdown()` exports the spans still queued (a no-op when tracing is off)."""

    enabled: bool
    provider: Any = None

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # BatchSpanProcessor.shutdown flushes first


def configure(
    service_name: str, endpoint: str | None = None, environ: Mapping[str, str] | None = None
) -> TracingHandle:
    """Install an SDK tracer provider exporting over OTLP/gRPC to `endpoint` (or OTEL_EXPORTER_OTLP_ENDPOINT).

    With neither, or without the opentelemetry SDK, nothing is installed and tracing stays a no-op.
    OTEL_SERVICE_NAME, when set, wins over `service_name` (the SDK's own rule).
    """
    environ = os.environ if environ is None else environ
    endpoint = endpoint or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return TracingHandle(enabled=False)
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        logger.warning("tracing requested (%s) but the opentelemetry SDK is missing: %s", endpoint, exc)
        return TracingHandle(enabled=False)
    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER[_ARG]
    insecure = not endpoint.startswith("https://")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure)))
    trace.set_tracer_provider(provider)
    logger.info("tracing to %s as %s", endpoint, resource.attributes["service.name"])
    return TracingHandle(enabled=True, provider=provider)


def enabled() -> bool:
    """True once an SDK tracer provider is installed (the API's default is a proxy to the no-op one)."""
    if trace is None:
        return False
    return type(trace.get_tracer_provider()).__name__ not in ("ProxyTracerProvider", "NoOpTracerProvider")


def _tracer() -> Any:
    return trace.get_tracer(INSTRUMENTATION)


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None, kind: str = "internal") -> Iterator[Any]:
    """A span named `name`, current for the `with` block; an exception marks it failed and passes through."""
    if trace is None:
        yield _NOOP_SPAN
        return
    with _tracer().start_as_current_span(name, kind=getattr(SpanKind, kind.upper()), attributes=attributes) as s:
        yield s


def current_span() -> Any:
    return _NOOP_SPAN if trace is None else trace.get_current_span()


def current_context() -> Any:
    """The current span's context, to link to from work done later on another thread; None when off."""
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


@contextlib.contextmanager
def linked_span(name: str, links: Sequence[Any], attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A new root span linked to `links` (span contexts), for work shared by several requests: one engine
    step serves a whole batch, so it belongs to no single request's trace."""
    if trace is None:
        yield _NOOP_SPAN
        return
    span_links = [trace.Link(c) for c in links if c is not None]
    with _tracer().start_as_current_span(name, context=trace.set_span_in_context(trace.INVALID_SPAN),
                                         links=span_links, attributes=attributes) as s:
        yield s


@contextlib.contextmanager
def child_span(name: str, attributes: Mapping[str, Any] | None = None, kind: str = "internal") -> Iterator[Any]:
    """Like `span`, but only under a recording span: work that runs per step (a remote sample call) is
    traced when its step is, and never starts a trace of its own."""
    if trace is None or not trace.get_current_span().is_recording():
        yield _NOOP_SPAN
        return
    with span(name, attributes, kind) as s:
        yield s


def outgoing_metadata(metadata: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...] | None:
    """`metadata` plus the current context's `traceparent` (and `tracestate`), for an outgoing call's
    `metadata=`; None when there is nothing to send, which grpc takes as no metadata."""
    carrier: dict[str, str] = {}
    if trace is not None:
        propagate.inject(carrier)
    pairs = (*metadata, *carrier.items())
    return pairs or None


def _extract(metadata: Sequence[Any] | None) -> Any:
    carrier = {m.key: m.value for m in metadata or () if isinstance(m.value, str)}
    return propagate.extract(carrier)


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A server span per RPC, continuing the caller's trace from its `traceparent` metadata.

    Install it inside the error interceptor, so a failing handler's span records the exception before
    it becomes a status code. Timer-driven RPCs (Stats, health, reflection) are not traced.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or trace is None or details.method.endswith(UNTRACED_SUFFIXES):
            return handler
        method = details.method
        return rewrap(handler, lambda behavior, streams_out: (_streaming if streams_out else _unary)(behavior, method))


def _server_span(method: str, context: grpc.aio.ServicerContext) -> Any:
    service, _, name = method.lstrip("/").partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
    parent = _extract(context.invocation_metadata())
    return _tracer().start_as_current_span(
        method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes=attributes
    )


def _unary(behavior: Callable, method: str) -> Callable:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with _server_span(method, context):
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

    return handler


def _streaming(behavior: Callable, method: str) -> Callable:
    if not inspect.isasyncgenfunction(behavior):  # writes with context.write, or returns an iterable
        return _unary(behavior, method)

    # grpc drives the generator from one task, so the span stays current across its yields.
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with _server_span(method, context):
            async for response in behavior(request, context):
                yield response

    return handler


def set_error(s: Any, code: str, message: str = "") -> None:
    """Mark `s` failed with a gRPC status name (the caller's view of an error it did not raise)."""
    if trace is not None and s.is_recording():
        s.set_status(Status(StatusCode.ERROR, message))
        s.set_attribute("rpc.grpc.status_code", code)


def record_span(name: str, start_ns: int, end_ns: int, attributes: Mapping[str, Any] | None = None) -> None:
    """A span that already happened (e.g. a queue wait measured by someone else), under the current span."""
    if trace is not None:
        _tracer().start_span(name, start_time=start_ns, attributes=attributes).end(end_time=end_ns)
