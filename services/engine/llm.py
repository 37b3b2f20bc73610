"""The in-process API: text in, text out, on top of the engine and the tokenizer.

This is what `stageserve generate --local` runs, and what the end-to-end tests compare the service
split against. Stop strings live here, not in the engine, because they need text: each step's new
tokens are detokenized incrementally and the request is ended where a stop string begins.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from stageserve.common.errors import InvalidArgumentError
from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine, RequestOutput
from stageserve.engine.factory import make_local_draft
from stageserve.engine.loader.weights import load_model
from stageserve.engine.parallel.launch import leader_rank
from stageserve.engine.runner import resolve_device
from stageserve.sample.params import SamplingParams
from stageserve.tokenizer.detokenize import (
    detokenize_incrementally,
    find_stop,
    initial_offsets,
    stop_holdback,
    stop_search_start,
)
from stageserve.tokenizer.text_tokenizer import TextTokenizer, load_tokenizer


@dataclass
class _TextState:
    """Incremental detokenization and stop-string state of one request."""

    stops: tuple[str, ...]
    prefix_offset: int
    read_offset: int
    text: str = ""  # all text decoded so far
    sent: int = 0  # characters of `text` already handed to the caller


@dataclass
class Completion:
    """A finished (or, while streaming, growing) generation."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    num_cached_tokens: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    ttft_s: float | None = None
    e2e_s: float | None = None
    text_state: _TextState | None = field(default=None, repr=False)

    def to_json(self) -> dict:
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
                "cached_tokens": self.num_cached_tokens,
            },
            "timing": {"ttft_s": self.ttft_s, "e2e_s": self.e2e_s},
        }


class LLM:
    def __init__(self, model: str | None = None, config: EngineConfig | None = None):
        config = config or EngineConfig()
        # under TP: rank 0's slices only
        loaded = load_model(model, tp=leader_rank(config, resolve_device(config.device)), quantization=config.quantization)
        self.tokenizer: TextTokenizer | None = (
            load_tokenizer(loaded.tokenizer_source) if loaded.tokenizer_source is not None else None
        )
        eos = self.tokenizer.stop_token_ids if self.tokenizer else frozenset()
        self.engine = LLMEngine(loaded, config, eos_token_ids=eos)
        self.engine.set_draft(make_local_draft(loaded, self.engine))  # --speculative: an in-process draft
        self._ids = itertools.count()

    @property
    def model_name(self) -> str:
        return self.engine.model_config.name

    def encode_prompt(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        """Raw text is tokenized as is: no BOS, no template. `chat` wraps it as one user message."""
        if isinstance(prompt, list):
            return prompt
        if not prompt:
            raise InvalidArgumentError("prompt", "must not be empty")
        if self.tokenizer is None:
            raise InvalidArgumentError("prompt", "this model has no tokenizer; pass token ids")
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams,
        *,
        chat: bool = False,
        cache_salt: str | None = None,
    ) -> list[Completion]:
        """Run every prompt to completion in one continuous batch; results in prompt order."""
        completions = [self.submit(p, params, chat=chat, cache_salt=cache_salt) for p in prompts]
        live = {c.request_id: c for c in completions}
        while live:
            for completion, _ in self._step(live):
                if completion.finish_reason is not None:
                    live.pop(completion.request_id)
        return completions

    def stream(
        self, prompt: str | list[int], params: SamplingParams, *, chat: bool = False
    ) -> Iterator[tuple[Completion, str]]:
        """Yield (completion so far, new text) after every step that adds text or finishes."""
        completion = self.submit(prompt, params, chat=chat)
        live = {completion.request_id: completion}
        try:
            while live:
                for c, delta in self._step(live):
                    if delta or c.finish_reason is not None:
                        yield c, delta
                    if c.finish_reason is not None:
                        live.pop(c.request_id)
        finally:
            if live:  # the consumer stopped early: free the request's blocks
                self.engine.abort(completion.request_id)

    def submit(
        self, prompt: str | list[int], params: SamplingParams, *, chat: bool = False, cache_salt: str | None = None
    ) -> Completion:
        ids = self.encode_prompt(prompt, chat)
        request_id = f"llm-{next(self._ids)}"
        self.engine.add_request(request_id, ids, params, cache_salt=cache_salt)
        return Completion(request_id, ids, text_state=_TextState(params.stop, *initial_offsets(ids)))

    def _step(self, live: dict[str, Completion]) -> list[tuple[Completion, str]]:
        results = []
        for out in self.engine.step():
            completion = live.get(out.request_id)
            if completion is not None:
                results.append((completion, self._apply(completion, out)))
        return results

    def _apply(self, c: Completion, out: RequestOutput) -> str:
        """Fold one step's output into the completion; returns the text that may now be shown."""
        now = time.monotonic()
        c.ttft_s = c.ttft_s if c.ttft_s is not None else now - c.arrival_time
        c.token_ids += out.new_token_ids
        c.logprobs += out.new_logprobs
        c.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            c.finish_reason = out.finish_reason
        delta = self._advance_text(c, stop_now=out.finished)
        if c.finish_reason is not None:
            c.e2e_s = now - c.arrival_time
        return delta

    def _advance_text(self, c: Completion, stop_now: bool) -> str:
        state = c.text_state
        if self.tokenizer is None or state is None:
            return ""
        new, state.prefix_offset, state.read_offset = detokenize_incrementally(
            self.tokenizer, c.prompt_token_ids + c.token_ids, state.prefix_offset, state.read_offset, final=stop_now
        )
        previous = len(state.text)
        state.text += new
        end = len(state.text)
        if state.stops:
            cut = find_stop(state.text, state.stops, stop_search_start(previous, state.stops))
            if cut is not None:
                state.text, end = state.text[:cut], cut
                if c.finish_reason is None:
                    self.engine.finish_stopped(c.request_id)
                c.finish_reason = "stop"
            elif c.finish_reason is None:
                end -= stop_holdback(state.text, state.stops)
        delta = state.text[state.sent : end]
        state.sent = max(state.sent, end)
        c.text = state.text if c.finish_reason is not None else state.text[: state.sent]
        return delta
