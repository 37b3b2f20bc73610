"""Bounded admission: at most `max_running` requests are routed at once, at most `max_queue` wait.

Life of a request here: arrive -> (a running slot is free: run at once | the queue has room: wait,
FIFO, for a slot | the queue is full: ResourceExhaustedError, i.e. RESOURCE_EXHAUSTED) -> run ->
release the slot on any exit (finish, error, cancellation). A waiter that is cancelled (client gone,
deadline passed) leaves the queue without taking a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from stageserve.common.errors import ResourceExhaustedError


class Admission:
    """A semaphore of running slots with a bounded wait queue in front of it. Lives on one event loop."""

    def __init__(self, max_running: int, max_queue: int):
        if max_running < 1 or max_queue < 0:
            raise ValueError(f"need max_running >= 1 and max_queue >= 0, got {max_running}, {max_queue}")
        self.max_running = max_running
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(max_running)
        self.num_running = 0
        self.num_waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold a running slot for the block; yields the seconds spent waiting for it."""
        start = time.monotonic()
        if self._slots.locked():
            if self.num_waiting >= self.max_queue:
                raise ResourceExhaustedError(
                    f"the gateway is full: {self.num_running} requests running and {self.num_waiting} queued",
                    retry_after_s=1.0,
                )
            self.num_waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.num_waiting -= 1
        else:
            await self._slots.acquire()  # free: returns without suspending
        self.num_running += 1
        try:
            yield time.monotonic() - start
        finally:
            self.num_running -= 1
            self._slots.release()
