"""The engine: requests in, tokens out, one scheduler step at a time. Pure library, no gRPC.

Not thread-safe: one thread owns an engine and calls `add_request`, `abort` and `step`; services
feed it from their event loop through a command queue (see the decode and prefill stages).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from stageserve.common.errors import InvalidArgumentError, NotFoundError
from stageserve.engine.config import EngineConfig, ModelConfig
from stageserve.engine.kv_cache_manager import KVCacheManager, KVPoolStats
from stageserve.engine.loader.weights import LoadedModel, load_model
from stageserve.engine.request import Request, RequestStatus
from stageserve.engine.runner import ModelRunner, resolve_device, resolve_dtype
from stageserve.engine.scheduler import Scheduler
from stageserve.sample.params import SamplingParams
from stageserve.sample.sampler import SampledToken


@dataclass
class RequestOutput:
    """What one step produced for one request: the new token (if any) and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    new_top_logprobs: list[list[tuple[int, float]]]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass
class EngineStats:
    kv: KVPoolStats
    num_running: int
    num_waiting: int
    num_steps: int
    num_preemptions: int


@dataclass
class StepCounters:
    steps: int = 0
    preemptions: int = 0
    computed_tokens: int = 0
    extra: dict = field(default_factory=dict)


class LLMEngine:
    def __init__(
        self,
        model: str | LoadedModel | None = None,
        config: EngineConfig | None = None,
        *,
        eos_token_ids: frozenset[int] = frozenset(),
    ):
        self.config = config or EngineConfig()
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        loaded = model if isinstance(model, LoadedModel) else load_model(model, device=self.device, dtype=self.dtype)
        self.model_source = loaded.source
        self.model_config: ModelConfig = loaded.config
        self.max_model_len = min(
            self.config.max_model_len or loaded.config.max_position_embeddings, loaded.config.max_position_embeddings
        )
        self.eos_token_ids = eos_token_ids
        self.kv = KVCacheManager(self.config.num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.kv)
        self.runner = ModelRunner(
            loaded.config,
            self.config,
            loaded.state_dict,
            device=self.device,
            dtype=self.dtype,
            eos_token_id=min(eos_token_ids) if eos_token_ids else None,
        )
        self.requests: dict[str, Request] = {}
        self.counters = StepCounters()

    # -- requests -------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> Request:
        """Validate and enqueue a request. Raises InvalidArgumentError naming the bad field."""
        self._validate(request_id, prompt_token_ids, params)
        request = Request(request_id, list(prompt_token_ids), params, cache_salt=cache_salt or None)
        self.scheduler.add(request)
        self.requests[request_id] = request
        return request

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if not request_id:
            raise InvalidArgumentError("request_id", "must not be empty")
        if request_id in self.requests:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already in flight")
        if not prompt:
            raise InvalidArgumentError("prompt", "must not be empty")
        vocab = self.model_config.vocab_size
        if any(not (0 <= t < vocab) for t in prompt):
            raise InvalidArgumentError("prompt_token_ids", f"token ids must be in [0, {vocab})")
        params.validate()
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidArgumentError(
                "max_tokens",
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length {self.max_model_len}",
            )
        blocks = -(-total // self.config.block_size)
        if blocks > self.config.num_blocks:
            raise InvalidArgumentError(
                "max_tokens", f"needs {blocks} KV blocks but the pool has {self.config.num_blocks}"
            )

    def abort(self, request_id: str) -> None:
        """Finish a request now and free its blocks. Unknown or finished ids raise NotFoundError."""
        request = self.requests.pop(request_id, None)
        if request is None:
            raise NotFoundError(f"no request {request_id!r} in flight")
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self.scheduler.remove_finished()

    def finish_stopped(self, request_id: str) -> None:
        """End a request because the caller found a stop string in its text."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
            self.scheduler.remove_finished()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        self.counters.preemptions += len(sched.preempted)
        if sched.is_empty:
            return []
        sampled = self.runner.execute(sched)
        self.counters.steps += 1
        self.counters.computed_tokens += sched.num_batched_tokens
        outputs = []
        for s, token in zip(sched.scheduled, sampled):
            request = s.request
            request.num_computed_tokens += s.num_new_tokens
            self.kv.cache_blocks(request)
            if token is not None:
                outputs.append(self._append_token(request, token))
        self.scheduler.remove_finished()
        return outputs

    def _append_token(self, request: Request, token: SampledToken) -> RequestOutput:
        request.output_token_ids.append(token.token_id)
        request.output_logprobs.append(token.logprob)
        if request.sampling_params.logprobs:
            request.output_top_logprobs.append(list(token.top_logprobs))
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        status = self._check_stop(request, token.token_id)
        if status is not None:
            self.scheduler.finish(request, status)
            self.requests.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token.token_id],
            new_logprobs=[token.logprob],
            new_top_logprobs=[list(token.top_logprobs)] if request.sampling_params.logprobs else [],
            finished=status is not None,
            finish_reason=status.value if status else None,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=max(request.num_cached_tokens, 0),
        )

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if token_id in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if num_out >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # -- conveniences --------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Run prompts to completion in one continuous batch; returns the finished requests in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        base = self.counters.steps
        requests = [
            self.add_request(f"gen-{base}-{i}-{time.monotonic_ns()}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params_list))
        ]
        while any(not r.is_finished for r in requests):
            self.step()
        return requests

    def stats(self) -> EngineStats:
        return EngineStats(
            kv=self.kv.stats(),
            num_running=len(self.scheduler.running),
            num_waiting=self.scheduler.num_waiting,
            num_steps=self.counters.steps,
            num_preemptions=self.counters.preemptions,
        )

    @torch.inference_mode()
    def warmup(self) -> None:
        """One short request through every code path, so the first real request is not slow."""
        request_id = "__warmup__"
        self.add_request(request_id, [0, 1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        while request_id in self.requests:
            self.step()
