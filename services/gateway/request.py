"""A validated `GenerateRequest`, and the messages the gateway sends back for it.

Every check that needs no other stage happens here, before the request takes an admission slot,
and each failure names the request field (`prompt`, `sampling_params.temperature`, ...).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from stageserve.common.convert import check_token_ids, sampling_params_from_pb, sampling_params_to_pb
from stageserve.common.errors import InvalidArgumentError, NotFoundError
from stageserve.sample.params import SamplingParams
from stageserve.v1 import common_pb2, gateway_pb2

MAX_REQUEST_ID_LENGTH = 256


@dataclass(frozen=True)
class GenerateInput:
    """What one Generate/Complete call asks for, checked."""

    request_id: str
    kind: Literal["prompt", "chat", "prompt_token_ids"]
    prompt: str  # kind "prompt"
    chat: tuple[common_pb2.ChatMessage, ...]  # kind "chat"
    prompt_token_ids: tuple[int, ...]  # kind "prompt_token_ids"
    params: SamplingParams
    add_special_tokens: bool
    skip_special_tokens: bool
    cache_salt: str
    want_logprobs: bool  # the client set `sampling_params.logprobs` (0 included)

    def token_bound(self) -> int:
        """An upper bound on the tokens this request may hold before it is tokenized: its prompt
        (a byte-level tokenizer makes at most one token per UTF-8 byte, plus a few per chat turn) and
        its max_tokens. Admission charges it against the queue's token bound."""
        if self.kind == "prompt_token_ids":
            prompt = len(self.prompt_token_ids)
        elif self.kind == "chat":
            prompt = sum(len(m.role.encode()) + len(m.content.encode()) + 8 for m in self.chat)
        else:
            prompt = len(self.prompt.encode())
        return prompt + self.params.max_tokens

    @classmethod
    def from_pb(
        cls, pb: gateway_pb2.GenerateRequest, *, model: str, default_max_tokens: int, vocab_size: int = 0
    ) -> GenerateInput:
        """Check `pb` against the served `model`; `vocab_size` 0 skips the token-id range check."""
        if pb.model and pb.model != model:
            raise NotFoundError(f"model {pb.model!r} is not served here; this deployment serves {model!r}")
        if len(pb.request_id) > MAX_REQUEST_ID_LENGTH:
            raise InvalidArgumentError("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters")
        kind = pb.WhichOneof("input")
        if kind is None or (kind == "prompt" and not pb.prompt):
            raise InvalidArgumentError("prompt", "must not be empty (or send chat or prompt_token_ids)")
        if kind == "chat" and not pb.chat.messages:
            raise InvalidArgumentError("chat.messages", "must not be empty")
        ids = tuple(pb.prompt_token_ids.ids)
        if kind == "prompt_token_ids":
            if not ids:
                raise InvalidArgumentError("prompt_token_ids.ids", "must not be empty")
            negative = next((i for i, t in enumerate(ids) if t < 0), None)
            if negative is not None:
                raise InvalidArgumentError(f"prompt_token_ids.ids[{negative}]", f"must be >= 0, got {ids[negative]}")
            if vocab_size:
                check_token_ids(ids, vocab_size, "prompt_token_ids.ids")
        params = sampling_params_from_pb(pb.sampling_params, default_max_tokens=default_max_tokens)
        return cls(
            request_id=pb.request_id or uuid.uuid4().hex,
            kind=kind,
            prompt=pb.prompt,
            chat=tuple(pb.chat.messages),
            prompt_token_ids=ids,
            params=params,
            add_special_tokens=pb.add_special_tokens,
            skip_special_tokens=pb.skip_special_tokens,
            cache_salt=pb.cache_salt,
            want_logprobs=pb.sampling_params.HasField("logprobs"),
        )

    def sampling_params_pb(self) -> common_pb2.SamplingParams:
        """The params to forward to prefill and decode, with the gateway's defaults filled in."""
        return sampling_params_to_pb(self.params)


@dataclass
class Usage:
    """Token counts of one request; `completion_tokens` grows as tokens arrive."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def to_pb(self) -> gateway_pb2.Usage:
        return gateway_pb2.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
        )


@dataclass(frozen=True)
class Timing:
    ttft_s: float
    e2e_s: float
    queue_s: float

    def to_pb(self) -> gateway_pb2.Timing:
        return gateway_pb2.Timing(ttft_s=self.ttft_s, e2e_s=self.e2e_s, queue_s=self.queue_s)


def complete_response(messages: Sequence[gateway_pb2.GenerateResponse]) -> gateway_pb2.CompleteResponse:
    """Fold a whole `Generate` stream into the one `Complete` reply."""
    reply = gateway_pb2.CompleteResponse()
    for message in messages:
        reply.request_id = message.request_id
        reply.prompt_token_ids.extend(message.prompt_token_ids)  # only the first message has them
        reply.token_ids.extend(message.token_ids)
        reply.logprobs.extend(message.logprobs)
        reply.text += message.text
        if message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            reply.finish_reason = message.finish_reason
            reply.usage.CopyFrom(message.usage)
            reply.timing.CopyFrom(message.timing)
    return reply
