"""Runs an LLMEngine on its own thread so gRPC servicers on the asyncio loop never block on a step.

Life of a call through the worker:

    servicer (event loop)                      engine thread
    ---------------------                      -------------
    await worker.call(fn)  -- command queue -->  between two steps: fn(engine)
                           <-- future result --
    async for out in worker.stream(id)         engine.step() -> RequestOutput
                           <-- per-request asyncio.Queue --

Commands run between steps, never during one, so the engine stays single-threaded. When the engine
has nothing to do the thread blocks on the command queue instead of spinning. If a step raises, every
in-flight stream gets the exception and the worker stays up for new requests; `healthy` turns False
if steps keep failing or a step outlives `step_timeout_s` (the watchdog reads `last_step_started`).

With `trace_steps` (a verbose tracing level) every step is a span of its own, linked to the span of each
request streaming from it: a step serves a whole batch, so it is a root span with links rather than a
child of any one request. Work inside the step (a remote sample call, a draft proposal) hangs off it,
and the step records how many draft tokens it verified and accepted.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from stageserve.common import tracing
from stageserve.engine.engine import LLMEngine, RequestOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_WAIT_S = 0.5  # how long an idle engine thread sleeps on the command queue before rechecking


class EngineWorker:
    def __init__(self, engine: LLMEngine, step_timeout_s: float = 30.0, trace_steps: bool = False):
        self.engine = engine
        self.step_timeout_s = step_timeout_s
        self.trace_steps = trace_steps
        self._trace_links: dict[str, Any] = {}  # request id -> its span context, with trace_steps
        self._commands: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], asyncio.Future]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.last_step_started: float | None = None  # monotonic time of the step in progress, if any
        self.consecutive_failures = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; must be called from the event loop that will use the worker."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        self._commands.put((lambda engine: None, self._loop.create_future()))  # wake the thread
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    @property
    def healthy(self) -> bool:
        if self._thread is None or not self._thread.is_alive() or self.consecutive_failures >= 3:
            return False
        started = self.last_step_started
        return started is None or time.monotonic() - started < self.step_timeout_s

    # -- calls from the event loop ----------------------------------------------------------------

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread between steps and return its result (or raise its error)."""
        future = self._loop.create_future()
        self._commands.put((fn, future))
        return await future

    async def stream(self, request_id: str, add: Callable[[LLMEngine], Any]) -> AsyncIterator[list[RequestOutput]]:
        """Add a request with `add(engine)` and yield its outputs, in batches of whatever has arrived.

        If the consumer stops early (cancellation, disconnect, error) the request is aborted, so its
        blocks are freed within one step.
        """
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = outputs
        if self.trace_steps:
            self._trace_links[request_id] = tracing.current_context()
        finished = False
        try:
            first = await self.call(add)
            if isinstance(first, RequestOutput):  # e.g. attach() whose first token already ended it
                outputs.put_nowait(first)
            while not finished:
                batch = [await outputs.get()]
                while not outputs.empty():
                    batch.append(outputs.get_nowait())
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                finished = batch[-1].finished
                yield batch
        finally:
            self._streams.pop(request_id, None)
            self._trace_links.pop(request_id, None)
            if not finished:
                await self.abort_quietly(request_id)

    async def abort_quietly(self, request_id: str) -> bool:
        """Abort if in flight; True if something was aborted."""

        def abort(engine: LLMEngine) -> bool:
            if request_id in engine.requests or request_id in engine.held:
                engine.abort(request_id)
                return True
            return False

        return await self.call(abort)

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._run_commands(block=not self.engine.has_unfinished())
            if self.engine.has_unfinished():
                self._step()

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = item
            try:
                result = fn(self.engine)
            except Exception as exc:  # delivered to the awaiting coroutine, which maps it to a status
                self._loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                self._loop.call_soon_threadsafe(_set_result, future, result)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        self.last_step_started = time.monotonic()
        try:
            if self.trace_steps:
                with tracing.linked_span("engine.step", list(self._trace_links.values())) as span:
                    spec = self.engine.speculator
                    before = (spec.counters.proposed, spec.counters.accepted) if spec is not None else (0, 0)
                    outputs = self.engine.step()
                    span.set_attribute("stageserve.step.num_outputs", len(outputs))
                    if spec is not None:  # this step's verification of draft tokens
                        span.set_attributes({
                            "stageserve.speculative.proposed_tokens": spec.counters.proposed - before[0],
                            "stageserve.speculative.accepted_tokens": spec.counters.accepted - before[1],
                        })
            else:
                outputs = self.engine.step()
            self.consecutive_failures = 0
        except Exception as exc:
            logger.exception("engine step failed; failing every in-flight request")
            self.consecutive_failures += 1
            self._fail_all(exc)
            return
        finally:
            self.last_step_started = None
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                self._loop.call_soon_threadsafe(stream.put_nowait, out)

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        for stream in list(self._streams.values()):
            self._loop.call_soon_threadsafe(stream.put_nowait, exc)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
