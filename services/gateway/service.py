"""The Gateway gRPC service: the front door. A thin layer over `Gateway` and `RequestFlow`.

Run one with
    stageserve serve gateway --tokenizer-addresses HOST:PORT --prefill-addresses HOST:PORT \\
        --decode-addresses HOST:PORT [HOST:PORT ...] --server-port 50050
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import grpc.aio

from stageserve.common.metrics import Metrics
from stageserve.common.server import ServerHandle, create_server, serve_until_stopped
from stageserve.gateway.config import GatewayServiceConfig
from stageserve.gateway.core import Gateway
from stageserve.gateway.request import complete_response
from stageserve.gateway.routing import Router
from stageserve.v1 import gateway_pb2, gateway_pb2_grpc

logger = logging.getLogger(__name__)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Generate (streaming), Complete (the same stream, folded) and ListModels."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        arrival = time.monotonic()
        checked = self.gateway.validate(request)
        async for message in self.gateway.generate(checked, arrival, context.time_remaining(), self._client(context)):
            yield message

    async def Complete(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CompleteResponse:
        arrival = time.monotonic()
        checked = self.gateway.validate(request)
        remaining, client = context.time_remaining(), self._client(context)
        messages = [m async for m in self.gateway.generate(checked, arrival, remaining, client)]
        return complete_response(messages)

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's identity for per-client limits: the configured metadata key, else the peer's host."""
        key = self.gateway.config.client_id_metadata_key
        for k, v in context.invocation_metadata() or ():
            if k == key and v:
                return str(v)[:128]
        return context.peer().rpartition(":")[0]  # "ipv4:127.0.0.1:40000" -> "ipv4:127.0.0.1"

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        config = self.gateway.config
        model = gateway_pb2.ModelInfo(id=config.model, max_model_len=config.max_model_len, vocab_size=config.vocab_size)
        return gateway_pb2.ListModelsResponse(models=[model])


@dataclasses.dataclass
class GatewayHandle(ServerHandle):
    """A started gateway: the server handle, plus the gateway whose channels and poller `stop` also closes."""

    gateway: Gateway | None = None

    async def stop(self, grace: float | None = None) -> None:
        await super().stop(grace)
        if self.gateway is not None:
            await self.gateway.close()


async def start(config: GatewayServiceConfig) -> GatewayHandle:
    """Connect to the workers, poll them once, start serving and report ready. The caller stops the handle.

    Workers that are down at start are simply out of rotation; requests needing a role with none
    left fail at once with UNAVAILABLE until one comes back.
    """
    router = Router.connect(
        config.tokenizer_addresses,
        config.prefill_addresses,
        config.decode_addresses,
        poll_interval_s=config.stats_poll_interval_s,
        probe_timeout_s=config.probe_timeout_s,
        security=config.server.security,
        probe_misses=config.probe_misses,
    )
    gateway = Gateway(config, router, Metrics())
    try:
        server = await create_server(config.server, [GatewayServicer(gateway)], metrics=gateway.metrics)
    except BaseException:
        await router.close()
        raise
    handle = GatewayHandle(**{f.name: getattr(server, f.name) for f in dataclasses.fields(server)}, gateway=gateway)
    try:
        await router.start()
    except BaseException:
        await handle.stop(grace=0)
        raise
    await handle.set_ready(True)
    logger.info(
        "gateway serving %s on %s (%d tokenizer, %d prefill, %d decode workers)",
        config.model,
        handle.address,
        len(router.tokenizers.workers),
        len(router.prefills.workers),
        len(router.decodes.workers),
    )
    return handle


async def serve(config: GatewayServiceConfig) -> None:
    await serve_until_stopped(await start(config))
