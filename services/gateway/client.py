"""An async client of the Gateway service, used by the CLI (`generate --target`, `chat`) and by `bench`.

    async with GatewayClient("localhost:50050") as client:
        async for message in client.generate("Hello", params=SamplingParams(max_tokens=32)):
            print(message.text, end="")
        reply = await client.complete("Hello")
        print(Generation.from_complete(reply).to_json())   # the shape of `generate --local --json`
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field


from stageserve.common.convert import finish_reason_from_pb, sampling_params_to_pb
from stageserve.common.security import SecurityConfig, aio_channel
from stageserve.sample.params import SamplingParams
from stageserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def build_request(
    prompt: str | None = None,
    *,
    chat: Sequence[dict[str, str]] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    params: SamplingParams | None = None,
    logprobs: bool = True,
    request_id: str = "",
    model: str = "",
    add_special_tokens: bool = False,
    skip_special_tokens: bool = True,
    cache_salt: str = "",
) -> gateway_pb2.GenerateRequest:
    """A GenerateRequest for exactly one of `prompt`, `chat` ([{"role", "content"}]) or `prompt_token_ids`.

    The defaults match the in-process `LLM`: no special tokens added to raw text, none shown in the output,
    and (`logprobs=True`) the sampled tokens' logprobs returned.
    """
    if sum(x is not None for x in (prompt, chat, prompt_token_ids)) != 1:
        raise ValueError("pass exactly one of prompt, chat and prompt_token_ids")
    params = params if params is not None else SamplingParams()
    sampling = sampling_params_to_pb(params)
    if logprobs:
        sampling.logprobs = params.logprobs  # set even at 0: "the sampled token's logprob only"
    request = gateway_pb2.GenerateRequest(
        request_id=request_id,
        model=model,
        sampling_params=sampling,
        add_special_tokens=add_special_tokens,
        skip_special_tokens=skip_special_tokens,
        cache_salt=cache_salt,
    )
    if prompt is not None:
        request.prompt = prompt
    elif chat is not None:
        request.chat.messages.extend(common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in chat)
    else:
        request.prompt_token_ids.ids.extend(prompt_token_ids)
    return request


@dataclass
class Generation:
    """A whole generation as the client saw it; `to_json` is the object `stageserve generate --json` prints."""

    request_id: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    cached_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None

    def add(self, message: gateway_pb2.GenerateResponse | gateway_pb2.CompleteResponse) -> None:
        """Fold in one stream message (or a whole CompleteResponse)."""
        self.request_id = message.request_id or self.request_id
        self.prompt_token_ids += message.prompt_token_ids
        self.token_ids += message.token_ids
        self.text += message.text
        self.logprobs += [t.logprob for t in message.logprobs]
        if message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = finish_reason_from_pb(message.finish_reason)
            self.cached_tokens = message.usage.cached_tokens
            self.ttft_s, self.e2e_s = message.timing.ttft_s, message.timing.e2e_s

    @classmethod
    def from_complete(cls, reply: gateway_pb2.CompleteResponse) -> Generation:
        generation = cls()
        generation.add(reply)
        return generation

    def to_json(self) -> dict:
        """The same keys and shape as the in-process `Completion.to_json()`."""
        return {
            "request_id": self.request_id,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "logprobs": self.logprobs,
            "usage": {
                "prompt_tokens": len(self.prompt_token_ids),
                "completion_tokens": len(self.token_ids),
                "cached_tokens": self.cached_tokens,
            },
            "timing": {"ttft_s": self.ttft_s, "e2e_s": self.e2e_s},
        }


class GatewayClient:
    """One channel to a gateway, reused for every call. Use it as an async context manager, or `close()` it."""

    def __init__(self, address: str, *, timeout_s: float | None = None, security: SecurityConfig | None = None):
        self.address = address
        self.timeout_s = timeout_s  # default deadline of each call; None: none
        # TLS (verify against security.tls_ca_file, client cert for mTLS) and the bearer token, if set.
        self._channel = aio_channel(address, security, [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self, prompt: str | None = None, *, timeout_s: float | None = None, traceparent: str | None = None, **kwargs
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Stream a generation (arguments as `build_request`). Closing the iterator before the end
        (`aclose()`, or `contextlib.aclosing`) cancels the request. A W3C `traceparent` continues that trace."""
        call = self._stub.Generate(
            build_request(prompt, **kwargs), timeout=timeout_s or self.timeout_s, metadata=_trace_metadata(traceparent)
        )
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()  # no-op once the stream has ended

    async def complete(
        self, prompt: str | None = None, *, timeout_s: float | None = None, traceparent: str | None = None, **kwargs
    ) -> gateway_pb2.CompleteResponse:
        """A whole generation in one reply (arguments as `build_request`)."""
        return await self._stub.Complete(
            build_request(prompt, **kwargs), timeout=timeout_s or self.timeout_s, metadata=_trace_metadata(traceparent)
        )

    async def list_models(self, *, timeout_s: float | None = None) -> list[gateway_pb2.ModelInfo]:
        reply = await self._stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=timeout_s or self.timeout_s)
        return list(reply.models)

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until the channel connects (raises TimeoutError after `timeout_s`)."""
        await asyncio.wait_for(self._channel.channel_ready(), timeout_s)


def _trace_metadata(traceparent: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying a W3C traceparent ("00-<trace id>-<span id>-<flags>"), checked loosely."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        raise ValueError(f"traceparent {traceparent!r} is not 00-<32 hex>-<16 hex>-<2 hex>")
    return (("traceparent", traceparent.strip()),)
