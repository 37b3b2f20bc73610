"""A request's state inside one engine.

Life of a request:

    add_request() -> WAITING --schedule()--> RUNNING --(stop | length)--> FINISHED_STOPPED / FINISHED_LENGTH
                        ^                      |
                        +------ PREEMPTED <----+  (KV pool ran out: blocks freed, recomputed later)

    abort() from any live state -> FINISHED_ABORTED, and its blocks go back to the pool at once.

In a prefill/decode split the two halves are separate engines:

    prefill worker:  add_request(prefill_only) -> ... -> first token -> FINISHED_*, blocks HELD
                     until release_held() (after the KV transfer, or on failure)
    decode worker:   reserve() -> RESERVED (blocks allocated, KV arriving) -> attach(first token)
                     -> WAITING -> RUNNING -> ... as above; cancel_reservation() frees a RESERVED one

`num_computed_tokens` chases `num_tokens`: a step computes some of the gap (a prefill chunk, or the one
token sampled last step), and when it catches up a new token is sampled. Prefix-cache hits,
chunked prefill and preemption by recompute are all just moves of that one counter.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from stageserve.sample.params import SamplingParams


class RequestStatus(enum.Enum):
    RESERVED = "reserved"
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    # Per generated token: [(token_id, logprob), ...] when top logprobs were asked for.
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit on first scheduling; -1 until then
    num_preemptions: int = 0
    first_token_time: float | None = None
    prefill_only: bool = False  # finish after the first token and hold the blocks for a KV transfer
    # Draft tokens to verify this step, appended after the last sampled token as extra query tokens.
    # They are not part of num_tokens: only the accepted ones become output tokens.
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
