"""State that every request of one gateway shares: its config, router, admission queue, the request
ids in flight, and the Cancel calls still running for requests that already ended."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from stageserve.common.errors import InvalidArgumentError
from stageserve.common.metrics import Metrics
from stageserve.gateway.admission import Admission
from stageserve.gateway.config import GatewayServiceConfig
from stageserve.gateway.flow import RequestFlow
from stageserve.gateway.request import GenerateInput
from stageserve.gateway.routing import Router
from stageserve.v1 import gateway_pb2


class Gateway:
    """State shared by every request of one gateway: config, router, admission, the ids in flight."""

    def __init__(self, config: GatewayServiceConfig, router: Router, metrics: Metrics | None = None):
        self.config = config
        self.router = router
        self.metrics = metrics or Metrics()
        self.admission = Admission(
            config.max_running_requests, config.max_queue_requests, config.max_queue_tokens,
            config.max_client_requests, config.retry_after_s,
        )
        self.active: set[str] = set()
        self._cleanups: set[asyncio.Task] = set()  # Cancel calls outliving the request that started them

    def validate(self, pb: gateway_pb2.GenerateRequest) -> GenerateInput:
        config = self.config
        return GenerateInput.from_pb(
            pb, model=config.model, default_max_tokens=config.default_max_tokens, vocab_size=config.vocab_size
        )

    async def generate(
        self, request: GenerateInput, arrival: float, time_remaining: float | None, client: str = ""
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Run `request`; `time_remaining` is the client's deadline in seconds from now (None: none);
        `client` names the caller for per-client limits."""
        if request.request_id in self.active:
            raise InvalidArgumentError("request_id", f"{request.request_id!r} is already in flight")
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self.active.add(request.request_id)
        try:
            async for message in RequestFlow(self, request, arrival, deadline, client).run():
                yield message
        finally:
            self.active.discard(request.request_id)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run `coro` to the end even if its caller is cancelled."""
        task = asyncio.create_task(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.wait(self._cleanups, timeout=self.config.cancel_timeout_s)
        await self.router.close()
