"""Bounded admission: at most `max_running` requests are routed at once; the queue in front of them is
bounded in requests and in tokens; one client may hold at most `max_per_client` of either.

Life of a request here: arrive -> (its client is at its limit: ResourceExhaustedError) -> (a running
slot is free and nobody queues: run at once | the queue has room in requests and tokens: wait, FIFO,
for a slot | the queue is full: ResourceExhaustedError) -> run -> release the slot on any exit
(finish, error, cancellation). A waiter that is cancelled (client gone, deadline passed) leaves the
queue without taking a slot. ResourceExhaustedError becomes RESOURCE_EXHAUSTED with the trailing
metadata `retry-after-s` (the interceptor), so a client knows when to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator

from stageserve.common.errors import ResourceExhaustedError


class Admission:
    """A semaphore of running slots with a bounded wait queue in front of it. Lives on one event loop."""

    def __init__(
        self, max_running: int, max_queue: int, max_queue_tokens: int = 0, max_per_client: int = 0,
        retry_after_s: float = 1.0,
    ):
        if max_running < 1 or max_queue < 0 or max_queue_tokens < 0 or max_per_client < 0:
            raise ValueError(
                f"need max_running >= 1 and the other bounds >= 0, got {max_running}, {max_queue}, "
                f"{max_queue_tokens}, {max_per_client}"
            )
        self.max_running = max_running
        self.max_queue = max_queue
        self.max_queue_tokens = max_queue_tokens  # 0: no token bound
        self.max_per_client = max_per_client  # 0: no per-client bound
        self.retry_after_s = retry_after_s
        self._slots = asyncio.Semaphore(max_running)
        self.num_running = 0
        self.num_waiting = 0
        self.queued_tokens = 0
        self.per_client: Counter[str] = Counter()  # running + queued requests per client identity

    def _refuse(self, why: str) -> ResourceExhaustedError:
        return ResourceExhaustedError(
            f"the gateway is full ({why}): {self.num_running} requests running, {self.num_waiting} queued "
            f"holding {self.queued_tokens} tokens",
            retry_after_s=self.retry_after_s,
        )

    def _check_queue(self, tokens: int) -> None:
        if self.num_waiting >= self.max_queue:
            raise self._refuse(f"queue holds {self.max_queue} requests")
        # An empty queue takes any one request, so a long prompt is never refused forever.
        if self.max_queue_tokens and self.num_waiting and self.queued_tokens + tokens > self.max_queue_tokens:
            raise self._refuse(f"queue holds {self.max_queue_tokens} tokens")

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int = 0, client: str = "") -> AsyncIterator[float]:
        """Hold a running slot for the block; yields the seconds spent waiting for it.

        `tokens` is what the request may cost (prompt bound + max_tokens); `client` its identity
        (empty: not limited per client)."""
        start = time.monotonic()
        if client and self.max_per_client and self.per_client[client] >= self.max_per_client:
            raise self._refuse(f"client {client!r} already has {self.per_client[client]} requests")
        if self._slots.locked():
            self._check_queue(tokens)
            self.num_waiting += 1
            self.queued_tokens += tokens
            self.per_client[client] += 1
            try:
                await self._slots.acquire()
            except BaseException:
                self._forget(client)
                raise
            finally:
                self.num_waiting -= 1
                self.queued_tokens -= tokens
        else:
            await self._slots.acquire()  # free: returns without suspending
            self.per_client[client] += 1
        self.num_running += 1
        try:
            yield time.monotonic() - start
        finally:
            self.num_running -= 1
            self._forget(client)
            self._slots.release()

    def _forget(self, client: str) -> None:
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]
