"""The server factory every stage uses: a started `grpc.aio` server with health, reflection and the
error interceptor.

    handle = await create_server(config.server, [DecodeServicer(engine)])
    ...load the model...
    await handle.set_ready(True)
    await handle.wait_for_termination()        # or: await handle.stop()

Health follows the Kubernetes split:
- liveness is the overall server name "": SERVING from the start, so a slow model load is not a crash;
- readiness is each service's full name (e.g. "stageserve.v1.Decode"): NOT_SERVING until the caller
  says `set_ready(True)`.
`stop(grace)` first turns everything NOT_SERVING (so load balancers drain), then lets in-flight
RPCs finish for `grace` seconds before cancelling them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stageserve.common.errors import InvalidArgumentError
from stageserve.common import tracing
from stageserve.common.interceptors import ErrorInterceptor
from stageserve.common.metrics import Metrics, serve_metrics
from stageserve.common.security import SecurityConfig, server_credentials, server_interceptors

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """How a stage's gRPC server listens. Each service's config nests one as its `server` field."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on; 0.0.0.0 for every interface"})
    port: int = field(default=0, metadata={"help": "port to listen on; 0 picks a free one", "min": 0, "max": 65535})
    max_receive_message_bytes: int = field(
        default=64 * MIB,
        metadata={"help": "largest request message accepted; larger ones fail with RESOURCE_EXHAUSTED", "min": 1024},
    )
    max_send_message_bytes: int = field(
        default=64 * MIB, metadata={"help": "largest response message sent", "min": 1024}
    )
    max_concurrent_rpcs: int | None = field(
        default=None, metadata={"help": "RPCs served at once before new ones are refused (default: no limit)", "min": 1}
    )
    grace_s: float = field(
        default=5.0, metadata={"help": "seconds in-flight RPCs get to finish on shutdown", "min": 0.0}
    )
    metrics_port: int = field(
        default=0,
        metadata={"help": "port of the Prometheus /metrics endpoint (on `host`); 0 disables it", "min": 0, "max": 65535},
    )
    security: SecurityConfig = field(default_factory=SecurityConfig)  # TLS/mTLS and token, in and out


@dataclass
class ServerHandle:
    """A started server, the port it actually bound, and its health state."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]  # full names of the application services (the readiness names)
    grace_s: float = 5.0
    address: str = ""  # host:port that clients dial
    stop_metrics: Callable[[], None] = lambda: None  # stops the /metrics HTTP server, if one runs
    watchdog: asyncio.Task | None = None  # keeps readiness in line with `keep_ready`'s check

    async def keep_ready(self, ready: Callable[[], bool], interval_s: float) -> None:
        """Readiness follows `ready()` (e.g. "the engine thread is alive and its step is not wedged"),
        checked now and every `interval_s` until `stop`. Liveness ("") is left SERVING: a wedged worker
        should leave rotation, and only its own supervisor decides whether to restart it."""
        last = ready()
        await self.set_ready(last)

        async def watch() -> None:
            nonlocal last
            while True:
                await asyncio.sleep(interval_s)
                now = ready()
                if now != last:
                    logging.getLogger(__name__).warning("readiness -> %s", "SERVING" if now else "NOT_SERVING")
                    await self.set_ready(now)
                    last = now

        self.watchdog = asyncio.create_task(watch(), name="readiness-watchdog")

    async def set_ready(self, ready: bool) -> None:
        """Report every application service SERVING (ready) or NOT_SERVING under its readiness name."""
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.service_names:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Fail health checks, then stop; in-flight RPCs get `grace` seconds (default: the config's)."""
        if self.watchdog is not None:
            self.watchdog.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_s if grace is None else grace)
        self.stop_metrics()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or `timeout` passes); True if it stopped.

        Cancelling the caller is safe: grpc awaits its shutdown future itself, and a cancelled future
        would make a later `stop(grace)` return at once instead of draining, hence the shield.
        """
        timed_out = await asyncio.shield(self.server.wait_for_termination(timeout))  # True on timeout
        return not timed_out


def service_name(servicer: Any) -> str:
    """Full proto name ("stageserve.v1.Decode") of the generated service `servicer` implements."""
    return _generated_base(servicer)[2]


def _generated_base(servicer: Any) -> tuple[type, Any, str]:
    """The generated `FooServicer` base of `servicer`, its `_pb2_grpc` module, and the service's full name."""
    for base in type(servicer).__mro__:
        module_name = base.__module__
        if base.__name__.endswith("Servicer") and module_name.endswith("_pb2_grpc"):
            grpc_module = importlib.import_module(module_name)
            pb2 = importlib.import_module(module_name.removesuffix("_grpc"))
            service = pb2.DESCRIPTOR.services_by_name.get(base.__name__.removesuffix("Servicer"))
            if service is not None:
                return base, grpc_module, service.full_name
    raise TypeError(f"{type(servicer).__name__} does not subclass a generated *Servicer class")


def _register(server: grpc.aio.Server, servicer: Any) -> str:
    base, grpc_module, full_name = _generated_base(servicer)
    add_to_server = getattr(grpc_module, f"add_{base.__name__}_to_server")
    add_to_server(servicer, server)
    return full_name


def _options(config: ServerConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        # One process per port: a second server on the same port should fail, not share it.
        ("grpc.so_reuseport", 0),
    ]


async def create_server(
    config: ServerConfig,
    servicers: Sequence[Any],
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    metrics: Metrics | None = None,
) -> ServerHandle:
    """Build, bind and start a server for `servicers` (instances of generated `*Servicer` subclasses).

    The auth interceptor (with a token configured) runs outermost, then the error interceptor, then (once `tracing.configure` installed a provider) the
    tracing interceptor, then `interceptors`. Liveness ("") is SERVING at once; every service's
    readiness stays NOT_SERVING until `handle.set_ready(True)`. With `config.metrics_port`, `metrics`
    is served over HTTP until the handle stops.
    """
    if not servicers:
        raise InvalidArgumentError("servicers", "at least one servicer is required")
    traced = [tracing.TracingInterceptor()] if tracing.enabled() else []
    server = grpc.aio.server(
        interceptors=[*server_interceptors(config.security), ErrorInterceptor(), *traced, *interceptors],
        options=_options(config),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    names = tuple(_register(server, s) for s in servicers)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
    address = f"{host}:{config.port}"
    try:
        credentials = server_credentials(config.security)
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
        raise InvalidArgumentError("port", f"cannot listen on {address}: {exc}") from exc
    await server.start()
    try:
        stop_metrics = serve_metrics(metrics or Metrics(), config.host, config.metrics_port)
    except OSError as exc:
        await server.stop(0)
        raise InvalidArgumentError("metrics_port", f"cannot serve metrics on {config.metrics_port}: {exc}") from exc
    return ServerHandle(
        server=server,
        port=port,
        health=health_servicer,
        service_names=names,
        grace_s=config.grace_s,
        address=f"{host}:{port}",
        stop_metrics=stop_metrics,
    )


async def serve_until_stopped(handle: ServerHandle, *cleanups: Callable[[], Awaitable[None]]) -> None:
    """Serve until the server stops or this task is cancelled (how SIGTERM arrives), then stop
    gracefully and run `cleanups` (e.g. stopping an engine thread). Every service's `serve()` ends here."""
    try:
        await handle.wait_for_termination()
    finally:
        await handle.stop()
        for cleanup in cleanups:
            await cleanup()
