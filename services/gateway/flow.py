"""The life of one request through the stages, as the gateway drives it.

    admit (bounded queue) -> Tokenize (text or chat; token ids skip it)
    -> choose prefill (fewest in flight) and decode (most KV headroom) -> Decode.Reserve
    -> Prefill (pushes the KV to the reservation; returns the first token) -> stream the first token
    -> finished already? Decode.Cancel frees the reservation : Decode.Attach streams the rest
    -> each TokenEvent: one Detokenize for all its tokens, stop strings, one message to the client
    -> the last message carries finish_reason, usage and timing.

A prefill or decode worker lost mid-request (its call fails UNAVAILABLE, or the gateway's probes find it
gone, which cuts its streams at once) fails the request with UNAVAILABLE, or, as `worker_retry` allows,
runs it again from Reserve on other workers: the prompt plus every token the client already has is
prefilled anew (prefix caching makes that cheap), with max_tokens reduced by as many.

Whatever ends the request early (client cancel, deadline, a stop string, a failed stage) cancels the
decode stream and calls Decode.Cancel and Prefill.Cancel, shielded from the cancellation that caused
it and bounded by `cancel_timeout_s`, so every stage frees the request's blocks within a step. Every
call to a worker has a timeout, and no wait is unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio

from stageserve.common import tracing
from stageserve.common.errors import DataLossError, DeadlineExceededError, InvalidArgumentError, UnavailableError
from stageserve.common.interceptors import status_for
from stageserve.gateway.request import GenerateInput, Timing, Usage
from stageserve.gateway.routing import DOWN_CODES, Worker, WorkerPool
from stageserve.gateway.text import TextStream
from stageserve.gateway.upstream import UpstreamError, WorkerLostError, upstream_error
from stageserve.v1 import common_pb2, decode_pb2, gateway_pb2, prefill_pb2, tokenizer_pb2

if TYPE_CHECKING:
    from stageserve.gateway.core import Gateway

logger = logging.getLogger(__name__)

T = TypeVar("T")
UNSPECIFIED = common_pb2.FINISH_REASON_UNSPECIFIED
RETRY_ELSEWHERE = frozenset({grpc.StatusCode.UNAVAILABLE})
# A Reserve that failed with these holds nothing to cancel (a timed-out one may have reserved).
NOTHING_RESERVED = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
)


class RequestFlow:
    """One request's trip through the stages (see the module docstring)."""

    def __init__(
        self, gateway: Gateway, request: GenerateInput, arrival: float, deadline: float | None, client: str = ""
    ):
        self.gw = gateway
        self.client = client
        self.config = gateway.config
        self.router = gateway.router
        self.request = request
        self.arrival = arrival
        self.deadline = deadline
        self.decode: Worker | None = None  # may hold a reservation or a running sequence for us
        self.prefill: Worker | None = None  # may be computing our prompt
        self.attach: Any = None  # the Decode.Attach call while it streams
        self.done = False  # every stage has freed (or is freeing) the request
        self.stopped_here = False  # a stop string matched here, so decode is still generating
        self.release: asyncio.Task | None = None  # the Cancel calls of a normal finish
        self.queue_s = 0.0
        self.ttft_s = 0.0
        self.last_token_at = 0.0  # when the latest tokens reached us (inter-token latency)
        self.generated: list[int] = []  # token ids the client has been sent (a retry prefills them too)
        self.params_pb = request.sampling_params_pb()  # of the current attempt: max_tokens shrinks on a retry
        self.avoid: list[Worker] = []  # workers lost during this request: no retry goes back to them
        self.lost = ""  # why a worker our stream depends on was found gone, once it is
        self.lost_address = ""  # and which
        self.metrics = gateway.metrics
        self.span = tracing.current_span()  # the request's root span, once `run` opens it

    async def run(self) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        attributes = {
            "gen_ai.operation.name": "chat" if self.request.kind == "chat" else "text_completion",
            "gen_ai.request.model": self.config.model,
            "gen_ai.request.max_tokens": self.request.params.max_tokens,
            "stageserve.request_id": self.request.request_id,
        }
        with tracing.span(f"generate {self.config.model}", attributes) as self.span:
            try:
                async for message in self._run():
                    yield message
            except BaseException as exc:
                code = "CANCELLED" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else None
                if isinstance(exc, Exception):
                    code = status_for(exc)[0].name
                if code is not None:
                    self.metrics.request_errors.labels(code=code).inc()
                    tracing.set_error(self.span, code, str(exc))
                raise

    async def _run(self) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        try:
            queued_ns = time.time_ns()
            async with self.gw.admission.slot(self.request.token_bound(), self.client) as self.queue_s:
                self.metrics.request_queue_time.observe(self.queue_s)
                tracing.record_span("gateway.queue", queued_ns, time.time_ns())
                prompt = await self._tokenize()
                text = TextStream(prompt, self.request.params.stop, self.request.skip_special_tokens, self._detokenize)
                usage = Usage(len(prompt), completion_tokens=0, cached_tokens=0)
                retries = 0
                while True:
                    try:
                        async for message in self._attempt(prompt, text, usage):
                            yield message
                        break
                    except WorkerLostError as exc:
                        if not self._may_retry(retries):
                            raise
                        retries += 1
                        logger.warning("request %s: %s; running it again elsewhere (retry %d, %d tokens so far)",
                                       self.request.request_id, exc, retries, len(self.generated))
                        self._forget_workers(exc.address)
        finally:
            if not self.done:
                await self._abort()
            if self.release is not None:  # sent the last message first; now make sure decode let go
                await asyncio.shield(self.release)

    async def _attempt(
        self, prompt: list[int], text: TextStream, usage: Usage
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Reserve, prefill and decode once; on a retry the prompt carries the tokens already sent."""
        tokens = prompt + self.generated
        self.params_pb = self.request.sampling_params_pb()
        if self.generated:
            self.params_pb.max_tokens -= len(self.generated)
            self.params_pb.min_tokens = max(0, self.params_pb.min_tokens - len(self.generated))
        prefill = self.router.prefills.choose(exclude=self.avoid)
        descriptor = await self._reserve(len(tokens), prefill)
        with self.router.decodes.track(self.decode):  # decode's load: the whole request, not one call
            async for message in self._stream(tokens, text, prefill, descriptor, usage):
                yield message

    def _may_retry(self, retries: int) -> bool:
        mode = self.config.worker_retry
        if mode == "off" or retries >= self.config.max_worker_retries:
            return False
        return mode == "always" or not self.generated

    def _forget_workers(self, lost_address: str) -> None:
        """Leave the failed attempt behind: free what its workers may still hold (in the background; a
        dead worker answers nothing) and never route this request back to the lost one."""
        self._cancel(prefill=True)
        self.avoid += [w for w in (self.decode, self.prefill) if w is not None and w.address == lost_address]
        self.decode = self.prefill = self.attach = None
        self.lost = self.lost_address = ""

    def _timeout(self, limit: float) -> float:
        """`limit`, cut to what is left of the client's deadline."""
        if self.deadline is None:
            return limit
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError(f"request {self.request.request_id}: the deadline passed")
        return min(limit, remaining)

    async def _call(
        self, pool: WorkerPool, attempt: Callable[[Worker], Awaitable[T]], retry: frozenset, first: Worker | None = None
    ) -> T:
        """`attempt` on the pool's best worker; on a status in `retry`, again on the next one, until none is left."""
        tried: list[Worker] = list(self.avoid)
        last_error: Exception | None = None
        worker = first
        while True:
            if worker is None:
                try:
                    worker = pool.choose(exclude=tried)
                except UnavailableError:
                    if last_error is None:
                        raise
                    raise last_error from None
            tried.append(worker)
            try:
                with pool.track(worker):
                    return await attempt(worker)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in DOWN_CODES:
                    pool.mark_down(worker, f"{exc.code().name}: {exc.details()}")
                last_error = upstream_error(pool.role, worker.address, exc)
                if exc.code() not in retry:
                    raise last_error from exc
            worker = None

    async def _tokenize(self) -> list[int]:
        request = self.request
        if request.kind == "prompt_token_ids":
            ids = list(request.prompt_token_ids)
        else:
            if request.kind == "chat":
                pb = tokenizer_pb2.TokenizeRequest(chat=common_pb2.ChatMessages(messages=request.chat))
            else:
                pb = tokenizer_pb2.TokenizeRequest(text=request.prompt, add_special_tokens=request.add_special_tokens)

            async def tokenize(worker: Worker) -> tokenizer_pb2.TokenizeResponse:
                timeout = self._timeout(self.config.rpc_timeout_s)
                return await worker.stub.Tokenize(pb, timeout=timeout, metadata=tracing.outgoing_metadata())

            with tracing.span("chat_template+tokenize" if request.kind == "chat" else "tokenize", kind="client"):
                ids = list((await self._call(self.router.tokenizers, tokenize, RETRY_ELSEWHERE)).token_ids)
            if not ids:
                raise InvalidArgumentError(request.kind, "tokenizes to no tokens")
        limit = self.config.max_model_len
        if limit and len(ids) >= limit:
            raise InvalidArgumentError(request.kind, f"is {len(ids)} tokens; the model's limit is {limit - 1}")
        return ids

    async def _detokenize(
        self, ids: Sequence[int], prefix: int, read: int, skip: bool, final: bool
    ) -> tuple[str, int, int]:
        pb = tokenizer_pb2.DetokenizeRequest(
            token_ids=ids, prefix_offset=prefix, read_offset=read, skip_special_tokens=skip, final=final
        )

        async def detokenize(worker: Worker) -> tokenizer_pb2.DetokenizeResponse:
            timeout = self._timeout(self.config.rpc_timeout_s)
            return await worker.stub.Detokenize(pb, timeout=timeout, metadata=tracing.outgoing_metadata())

        with tracing.span("detokenize", {"stageserve.num_tokens": len(ids)}, kind="client"):
            reply = await self._call(self.router.tokenizers, detokenize, RETRY_ELSEWHERE)
        return reply.text, reply.prefix_offset, reply.read_offset

    async def _reserve(self, num_tokens: int, prefill: Worker) -> common_pb2.KVTransferDescriptor:
        """Reserve on the decode worker with the most headroom; a full or unreachable one passes to the next.
        Decode picks the KV transport from what `prefill` can send (cuda-ipc only if on the same host)."""
        pb = decode_pb2.ReserveRequest(
            request_id=self.request.request_id,
            num_tokens=num_tokens,
            sampling_params=self.params_pb,
            peer_id=prefill.address,
            transports=prefill.kv_transports,
            peer_host_id=prefill.host_id,
        )

        async def reserve(worker: Worker) -> decode_pb2.ReserveResponse:
            self.decode = worker  # set first: a cancel landing mid-call must still free what it reserved
            # Counted against the worker's headroom while the call is out, so that requests arriving
            # together spread over the replicas instead of all taking the one the last poll favoured.
            provisional = worker.blocks_for(num_tokens)
            worker.pending_blocks += provisional
            try:
                timeout = self._timeout(self.config.rpc_timeout_s)
                return await worker.stub.Reserve(pb, timeout=timeout, metadata=tracing.outgoing_metadata())
            except grpc.aio.AioRpcError as exc:
                if exc.code() in NOTHING_RESERVED:
                    self.decode = None
                raise
            finally:  # a poll may have reset the count meanwhile
                worker.pending_blocks = max(0, worker.pending_blocks - provisional)

        retry = RETRY_ELSEWHERE | {grpc.StatusCode.RESOURCE_EXHAUSTED}
        with tracing.span("decode.reserve", kind="client"):
            reply = await self._call(self.router.decodes, reserve, retry)
        self.decode.pending_blocks += len(reply.descriptor.block_ids)
        return reply.descriptor

    async def _prefill(
        self, prompt: list[int], prefill: Worker, descriptor: common_pb2.KVTransferDescriptor
    ) -> prefill_pb2.PrefillResponse:
        request = self.request
        pb = prefill_pb2.PrefillRequest(
            request_id=request.request_id,
            prompt_token_ids=prompt,
            sampling_params=self.params_pb,
            cache_salt=request.cache_salt,
            decode_target=prefill_pb2.DecodeTarget(address=self.decode.address, kv=descriptor),
        )

        async def run_prefill(worker: Worker) -> prefill_pb2.PrefillResponse:
            self.prefill = worker
            timeout = self._timeout(self.config.rpc_timeout_s)
            return await worker.stub.Prefill(pb, timeout=timeout, metadata=tracing.outgoing_metadata())

        # GPU transports pair the reservation with the peer it named; only "host" may go to another worker.
        retry = RETRY_ELSEWHERE if descriptor.transport in ("", "host") else frozenset()
        with tracing.span("prefill", {"stageserve.kv.transport": descriptor.transport}, kind="client") as s:
            reply = await self._call(self.router.prefills, run_prefill, retry, first=prefill)
            s.set_attribute("stageserve.prefill.num_cached_tokens", reply.num_cached_tokens)
            s.set_attribute("stageserve.prefill.num_computed_tokens", reply.num_computed_tokens)
        return reply

    async def _stream(
        self, prompt: list[int], text: TextStream, prefill: Worker, descriptor: common_pb2.KVTransferDescriptor,
        usage: Usage,
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        reply = await self._prefill(prompt, prefill, descriptor)
        self.last_token_at = time.monotonic()
        first_attempt = not self.generated
        if first_attempt:
            self.ttft_s = self.last_token_at - self.arrival
            self.metrics.time_to_first_token.observe(self.ttft_s)
            self.span.set_attribute("gen_ai.usage.input_tokens", len(prompt))
            usage.cached_tokens = reply.num_cached_tokens
        message = await self._message([reply.first_token], reply.finish_reason, text, usage)
        if first_attempt:
            message.prompt_token_ids.extend(prompt)
        if message.finish_reason != UNSPECIFIED:
            yield self._finish(message)
            return
        yield message
        with tracing.span("decode", {"stageserve.decode.address": self.decode.address}, kind="client"):
            async for message in self._decode(prompt, text, descriptor, reply, usage):
                yield message

    async def _decode(
        self,
        prompt: list[int],
        text: TextStream,
        descriptor: common_pb2.KVTransferDescriptor,
        reply: prefill_pb2.PrefillResponse,
        usage: Usage,
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        event = await self._attach_landed(prompt, descriptor, reply)
        decode = self.decode
        with _watching(decode, self._decode_lost):
            while True:
                self._observe_tokens(len(event.tokens))
                message = await self._message(event.tokens, event.finish_reason, text, usage)
                if message.finish_reason != UNSPECIFIED:
                    yield self._finish(message)
                    return
                if message.token_ids or message.text:
                    yield message
                event = await self._next_event(decode)

    async def _attach_landed(
        self, prompt: list[int], descriptor: common_pb2.KVTransferDescriptor, reply: prefill_pb2.PrefillResponse
    ) -> decode_pb2.TokenEvent:
        """Attach and read the first event. Decode answers DATA_LOSS before any token when the pages landed
        corrupt (and it has already freed them): prefill again into a new reservation and attach with the
        first token the client already has, up to `kv_retries` times, so nothing is decoded on bad KV."""
        for attempt in range(self.config.kv_retries + 1):
            self._open_attach(prompt, descriptor, reply)
            try:
                # Until decode's first event the KV may still be on its way from the prefill worker (it
                # returned the first token before sending): if that worker is found gone, the KV never comes.
                with _watching(self.decode, self._decode_lost), _watching(self.prefill, self._prefill_lost):
                    return await self._next_event(self.decode)
            except DataLossError as exc:
                if attempt == self.config.kv_retries:
                    raise
                logger.warning("%s: %s; prefilling again (%d of %d)", self.request.request_id, exc, attempt + 1,
                               self.config.kv_retries)
                self.span.add_event("kv_retry", {"stageserve.reason": str(exc)})
            self.attach = None
            descriptor = await self._reserve(len(prompt), self.prefill)
            await self._prefill(prompt, self.prefill, descriptor)  # its first token is dropped: the client has ours
        raise AssertionError("unreachable")

    def _open_attach(
        self, prompt: list[int], descriptor: common_pb2.KVTransferDescriptor, reply: prefill_pb2.PrefillResponse
    ) -> None:
        self.attach = self.decode.stub.Attach(
            decode_pb2.AttachRequest(
                request_id=self.request.request_id,
                reservation_id=descriptor.reservation_id,
                first_token=reply.first_token,
                prompt_token_ids=prompt,
                sampling_params=self.params_pb,
                num_cached_tokens=reply.num_cached_tokens,
            ),
            timeout=None if self.deadline is None else self._timeout(float("inf")),
            metadata=tracing.outgoing_metadata(),
        )

    def _decode_lost(self, reason: str) -> None:
        """The router found our decode worker gone: cut the stream now (`_next_event` reports why)."""
        self._cut(f"decode worker {self.decode.address} is gone: {reason}", self.decode.address)

    def _prefill_lost(self, reason: str) -> None:
        self._cut(f"prefill worker {self.prefill.address} is gone before its KV transfer landed: {reason}",
                  self.prefill.address)

    def _cut(self, why: str, address: str) -> None:
        self.lost, self.lost_address = why, address
        if self.attach is not None:
            self.attach.cancel()

    async def _next_event(self, decode: Worker) -> decode_pb2.TokenEvent:
        idle = self.config.stream_idle_timeout_s
        try:
            async with asyncio.timeout(self._timeout(idle)):
                event = await self.attach.read()
        except TimeoutError:
            raise DeadlineExceededError(f"decode worker {decode.address}: no tokens for {idle:g} s") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self.lost or (task is not None and task.cancelling()):  # our own cancellation: pass it on
                raise
            raise WorkerLostError(self.lost, self.lost_address) from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() in DOWN_CODES:
                self.router.decodes.mark_down(decode, f"{exc.code().name}: {exc.details()}")
            raise upstream_error("decode", decode.address, exc) from exc
        if event is grpc.aio.EOF:
            raise UpstreamError(f"decode worker {decode.address} ended the stream without a finish reason")
        return event

    async def _message(
        self,
        tokens: Sequence[common_pb2.SampledToken],
        finish_reason: int,
        text: TextStream,
        usage: Usage,
    ) -> gateway_pb2.GenerateResponse:
        """The client message for one batch of new tokens; a stop string it completes finishes the request."""
        ids = [t.token_id for t in tokens]
        self.generated += ids
        usage.completion_tokens += len(ids)
        delta = await text.add(ids, finished=finish_reason != UNSPECIFIED)
        if text.stopped and finish_reason == UNSPECIFIED:
            finish_reason, self.stopped_here = common_pb2.FINISH_REASON_STOP, True
        message = gateway_pb2.GenerateResponse(request_id=self.request.request_id, token_ids=ids, text=delta)
        if self.request.want_logprobs:
            message.logprobs.extend(tokens)
        if finish_reason != UNSPECIFIED:
            message.finish_reason = finish_reason
            message.usage.CopyFrom(usage.to_pb())
        return message

    def _observe_tokens(self, count: int) -> None:
        """Inter-token latency: the wait for this event, spread over the tokens it carries."""
        now = time.monotonic()
        for _ in range(count):
            self.metrics.inter_token_latency.observe((now - self.last_token_at) / count)
        self.last_token_at = now

    def _finish(self, message: gateway_pb2.GenerateResponse) -> gateway_pb2.GenerateResponse:
        """Complete the last message. Decode still holds the request if it finished on the first token (the
        reservation) or on a stop string found here (the running sequence): start freeing it."""
        if self.attach is None or self.stopped_here:
            self.release = self._cancel(prefill=False)
        self.done = True
        timing = Timing(self.ttft_s, time.monotonic() - self.arrival, self.queue_s)
        message.timing.CopyFrom(timing.to_pb())
        reason = common_pb2.FinishReason.Name(message.finish_reason).removeprefix("FINISH_REASON_").lower()
        self.metrics.e2e_request_latency.observe(timing.e2e_s)
        self.metrics.request_success.labels(finish_reason=reason).inc()
        self.span.set_attributes({
            "gen_ai.usage.output_tokens": message.usage.completion_tokens,
            "gen_ai.response.finish_reasons": (reason,),
            "stageserve.usage.cached_tokens": message.usage.cached_tokens,
        })
        return message

    async def _abort(self) -> None:
        """Free the request on every stage that may hold it, shielded from the cancellation that got us here."""
        task = self._cancel(prefill=True)
        if task is not None:
            await asyncio.shield(task)

    def _cancel(self, prefill: bool) -> asyncio.Task | None:
        """Stop the decode stream and start Decode.Cancel (and Prefill.Cancel), each bounded by cancel_timeout_s."""
        if self.attach is not None:
            self.attach.cancel()
        calls = []
        request_id, timeout = self.request.request_id, self.config.cancel_timeout_s
        if self.decode is not None:
            pb = decode_pb2.DecodeCancelRequest(request_id=request_id)
            calls.append(self.decode.stub.Cancel(pb, timeout=timeout, metadata=tracing.outgoing_metadata()))
        if prefill and self.prefill is not None:
            pb = prefill_pb2.PrefillCancelRequest(request_id=request_id)
            calls.append(self.prefill.stub.Cancel(pb, timeout=timeout, metadata=tracing.outgoing_metadata()))
        return self.gw.spawn(_settle(request_id, calls)) if calls else None


async def _settle(request_id: str, calls: list[Awaitable[Any]]) -> None:
    for result in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(result, Exception):
            logger.warning("cancelling request %s: %s", request_id, result)


@contextlib.contextmanager
def _watching(worker: Worker | None, notify: Callable[[str], None]) -> Iterator[None]:
    """Have the router call `notify` if `worker` is found gone while the block runs."""
    if worker is None:
        yield
        return
    worker.on_lost.add(notify)
    try:
        yield
    finally:
        worker.on_lost.discard(notify)
