"""The engine: requests in, tokens out, one scheduler step at a time. Pure library, no gRPC.

Not thread-safe: one thread owns an engine and calls `add_request`, `abort` and `step`; services
feed it from their event loop through a command queue (see the decode and prefill stages).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from stageserve.common.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from stageserve.engine.config import EngineConfig, ModelConfig
from stageserve.engine.kv_cache_manager import KVCacheManager, KVPoolStats
from stageserve.engine.loader.weights import LoadedModel, load_model
from stageserve.engine.parallel.launch import leader_rank, start_tensor_parallel
from stageserve.engine.request import Request, RequestStatus
from stageserve.engine.runner import ModelRunner, resolve_device, resolve_dtype
from stageserve.engine.scheduler import Scheduler, SchedulerOutput
from stageserve.engine.speculative import DraftClient, Speculator
from stageserve.sample.params import SamplingParams
from stageserve.sample.rejection import verify_by_match
from stageserve.sample.sampler import SampledToken

logger = logging.getLogger(__name__)


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
    num_reserved_blocks: int  # decode: allocated for KV that is still arriving
    num_held_blocks: int  # prefill: kept for a KV transfer that has not finished
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
        draft: DraftClient | None = None,
    ):
        self.config = config or EngineConfig()
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        tp = leader_rank(self.config, self.device)  # None unless tensor_parallel_size > 1
        loaded = model if isinstance(model, LoadedModel) else load_model(
            model, device=self.device, dtype=self.dtype, tp=tp, quantization=self.config.quantization
        )
        self.model_source = loaded.source
        _warn_if_requantizing(loaded, self.config)
        self.model_config: ModelConfig = loaded.config
        self.max_model_len = min(
            self.config.max_model_len or loaded.config.max_position_embeddings, loaded.config.max_position_embeddings
        )
        self.eos_token_ids = eos_token_ids
        self.kv = KVCacheManager(self.config.num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.kv)
        runner_kwargs = dict(device=self.device, dtype=self.dtype, eos_token_id=eos_token_ids or None, max_model_len=self.max_model_len)
        if tp is not None:  # rank 0 here, the other ranks in child processes (EngineConfig rules out quantization)
            self.runner = start_tensor_parallel(loaded, self.config, **runner_kwargs)
        else:
            calibration = _calibration_tokens(loaded, self.config)
            self.runner = ModelRunner(loaded.config, self.config, loaded.state_dict, **runner_kwargs, calibration_tokens=calibration)
        self.requests: dict[str, Request] = {}
        self.held: dict[str, Request] = {}  # finished prefill-only requests whose blocks await transfer
        # Prefill-only requests whose KV a transport pushes layer by layer: called as (layer, block ids)
        # after each layer of the step that completes the prompt (see `watch_layers`).
        self.layer_watchers: dict[str, Callable[[int, list[int]], None]] = {}
        self.counters = StepCounters()
        self.speculator: Speculator | None = None
        if draft is not None:
            self.set_draft(draft)

    def set_draft(self, draft: DraftClient | None) -> None:
        """Speculate with proposals from `draft` (None: stop speculating). Call between steps."""
        self.speculator = Speculator(self.config.speculative_config(), draft) if draft is not None else None

    # -- requests -------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        prefill_only: bool = False,
    ) -> Request:
        """Validate and enqueue a request. Raises InvalidArgumentError naming the bad field.

        A `prefill_only` request finishes after its first token and keeps its blocks (see
        `held_block_ids` / `release_held`) so a KV transport can read them.
        """
        self._validate(request_id, prompt_token_ids, params)
        request = Request(
            request_id, list(prompt_token_ids), params, cache_salt=cache_salt or None, prefill_only=prefill_only
        )
        self.scheduler.add(request)
        self.requests[request_id] = request
        return request

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if not request_id:
            raise InvalidArgumentError("request_id", "must not be empty")
        if request_id in self.requests or request_id in self.held:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already in flight")
        if not prompt:
            raise InvalidArgumentError("prompt", "must not be empty")
        self._check_token_ids("prompt_token_ids", prompt)
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
        """Finish a request in any state (waiting, running, reserved or held) and free its blocks now.

        Unknown or already released ids raise NotFoundError.
        """
        self.layer_watchers.pop(request_id, None)
        request = self.requests.pop(request_id, None)
        self._release_draft(request_id)
        if request is not None and request.status is RequestStatus.RESERVED:
            request.status = RequestStatus.FINISHED_ABORTED
            self.kv.free(request)
            return
        if request is not None:
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
            self.scheduler.remove_finished()
            return
        held = self.held.pop(request_id, None)
        if held is None:
            raise NotFoundError(f"no request {request_id!r} in flight")
        self.kv.free(held)

    # -- disaggregation: the prefill side holds blocks, the decode side reserves them ------------

    def held_block_ids(self, request_id: str) -> list[int]:
        """Blocks of a finished prefill-only request, in token order, until `release_held`."""
        if request_id not in self.held:
            raise NotFoundError(f"no held KV for request {request_id!r}")
        return self.kv.block_ids(request_id)

    def watch_layers(self, request_id: str, watcher: Callable[[int, list[int]], None] | None) -> None:
        """Call `watcher(layer, block_ids)` after each layer of the step that completes `request_id`'s
        prompt (all its blocks, cached prefix included, hold that layer's KV by then); None stops it."""
        if watcher is None:
            self.layer_watchers.pop(request_id, None)
        else:
            self.layer_watchers[request_id] = watcher

    def _layer_hook(self, sched) -> Callable[[int], None] | None:
        if not self.layer_watchers:
            return None
        done = [
            (self.layer_watchers[s.request.request_id], self.kv.block_ids(s.request.request_id))
            for s in sched.scheduled
            if s.request.request_id in self.layer_watchers
            and s.request.num_computed_tokens + s.num_new_tokens >= len(s.request.prompt_token_ids)
        ]
        if not done:
            return None

        def on_layer(layer: int) -> None:
            for watcher, block_ids in done:
                watcher(layer, block_ids)

        return on_layer

    def release_held(self, request_id: str) -> None:
        held = self.held.pop(request_id, None)
        if held is not None:
            self.kv.free(held)

    def reserve(self, request_id: str, num_prompt_tokens: int, params: SamplingParams) -> list[int]:
        """Allocate blocks for a prompt whose KV will arrive from a prefill worker.

        Raises ResourceExhaustedError when the pool is short, InvalidArgumentError for bad sizes.
        """
        self._validate(request_id, [0] * num_prompt_tokens, params)
        request = Request(request_id, [0] * num_prompt_tokens, params, status=RequestStatus.RESERVED)
        if self.kv.allocate_slots(request, num_prompt_tokens) is None:
            self.kv.free(request)
            raise ResourceExhaustedError(f"KV pool cannot hold {num_prompt_tokens} more tokens now", retry_after_s=0.5)
        self.requests[request_id] = request
        return self.kv.block_ids(request_id)

    def attach(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token: SampledToken,
        num_cached_tokens: int = 0,
    ) -> RequestOutput | None:
        """Turn a reservation whose KV has landed into a running request that continues after `first_token`.

        Returns a finished RequestOutput if the first token already ends the request, else None.
        """
        request = self.requests.get(request_id)
        if request is None or request.status is not RequestStatus.RESERVED:
            raise NotFoundError(f"no reservation for request {request_id!r}")
        if len(prompt_token_ids) != len(request.prompt_token_ids):
            raise InvalidArgumentError(
                "prompt_token_ids", f"{len(prompt_token_ids)} tokens, but {len(request.prompt_token_ids)} were reserved"
            )
        self._check_token_ids("prompt_token_ids", prompt_token_ids)
        self._check_token_ids("first_token", [first_token.token_id])
        self.scheduler.check_capacity()  # before any change, so a refusal leaves the reservation intact
        request.prompt_token_ids = list(prompt_token_ids)
        request.num_computed_tokens = len(prompt_token_ids)
        request.num_cached_tokens = num_cached_tokens
        self.kv.cache_blocks(request)
        out = self._append_token(request, first_token)
        if out.finished:
            return out
        self.scheduler.add(request)
        return None

    def _check_token_ids(self, field: str, ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        if any(not (0 <= t < vocab) for t in ids):
            raise InvalidArgumentError(field, f"token ids must be in [0, {vocab})")

    def finish_stopped(self, request_id: str) -> None:
        """End a request because the caller found a stop string in its text."""
        request = self.requests.pop(request_id, None)
        self._release_draft(request_id)
        if request is not None:
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
            self.scheduler.remove_finished()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            self.speculator.plan(self.scheduler.running, self.max_model_len)
        sched = self.scheduler.schedule()
        self.counters.preemptions += len(sched.preempted)
        if sched.is_empty:
            return []
        shape = _decode_shape(sched) if self.speculator is not None else None
        start = time.perf_counter()
        sampled = self.runner.execute(sched, self._layer_hook(sched))
        self.counters.steps += 1
        self.counters.computed_tokens += sched.num_batched_tokens
        outputs = []
        for s, tokens in zip(sched.scheduled, sampled):
            out = self._apply(s.request, s.num_new_tokens, tokens)
            if out is not None:
                outputs.append(out)
        self.scheduler.remove_finished()
        if shape is not None:  # the step's whole cost, verification and bookkeeping included (not the draft call)
            self.speculator.observe_step(*shape, time.perf_counter() - start)
        return outputs

    def _apply(self, request: Request, num_new: int, tokens: list[SampledToken]) -> RequestOutput | None:
        """Advance a request by one step's result; with draft tokens, verify them first.

        Row j of `tokens` is the target's own token after the first j drafts, so the accepted drafts
        are exactly the longest prefix that equals those tokens, and row m (m accepted) is the bonus
        token. Appending rows 0..m one at a time is then the same sequence of events as m + 1 plain
        steps: the same stop checks, the same blocks cached. KV written for rejected drafts is past
        num_computed_tokens, so it is never read, and its blocks are freed.
        """
        spec, request.spec_token_ids = request.spec_token_ids, []
        final = request.num_computed_tokens + num_new
        if spec and tokens:
            m = verify_by_match(spec, [t.token_id for t in tokens]).num_accepted
            self.speculator.observe(request, len(spec), m)
            tokens, final = tokens[: m + 1], final - (len(spec) - m)
        if not tokens:  # mid-prefill
            request.num_computed_tokens = final
            self.kv.cache_blocks(request)
            return None
        out = None
        for i, token in enumerate(tokens):
            request.num_computed_tokens = final - (len(tokens) - 1 - i)
            self.kv.cache_blocks(request)
            out = _merge(out, self._append_token(request, token))
            if out.finished:
                return out
        if spec:
            self.kv.trim(request, request.num_computed_tokens + 1)
        return out

    def _release_draft(self, request_id: str) -> None:
        if self.speculator is not None:
            self.speculator.release(request_id)

    def _append_token(self, request: Request, token: SampledToken) -> RequestOutput:
        request.output_token_ids.append(token.token_id)
        request.output_logprobs.append(token.logprob)
        if request.sampling_params.logprobs:
            request.output_top_logprobs.append(list(token.top_logprobs))
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        status = self._check_stop(request, token.token_id)
        handed_off = status is None and request.prefill_only  # a decode worker carries on from here
        if handed_off:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(request, status, free_blocks=not request.prefill_only)
            self.requests.pop(request.request_id, None)
            self._release_draft(request.request_id)
            if request.prefill_only:
                self.held[request.request_id] = request
                self.layer_watchers.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token.token_id],
            new_logprobs=[token.logprob],
            new_top_logprobs=[list(token.top_logprobs)] if request.sampling_params.logprobs else [],
            finished=status is not None,
            finish_reason=status.value if status and not handed_off else None,
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
            num_reserved_blocks=sum(
                len(self.kv.block_ids(r.request_id)) for r in self.requests.values() if r.status is RequestStatus.RESERVED
            ),
            num_held_blocks=sum(len(self.kv.block_ids(rid)) for rid in self.held),
            num_steps=self.counters.steps,
            num_preemptions=self.counters.preemptions,
        )

    @torch.inference_mode()
    def warmup(self) -> None:
        """One short request through every code path, so the first real request is not slow. Its 16-token
        prompt is longer than a quantized layer's small-batch limit, so the prefill path (on the CPU: the
        dense copy of packed weights, made once) is ready too."""
        request_id = "__warmup__"
        self.add_request(request_id, list(range(16)), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        while request_id in self.requests:
            self.step()
        self.runner.capture_graphs()


def _decode_shape(sched: SchedulerOutput) -> tuple[int, int] | None:
    """(sequences, longest query run) of a step in which every sequence decodes or verifies drafts;
    None for a step with prompt tokens, whose time says nothing about decode."""
    if any(s.request.num_computed_tokens != s.request.num_tokens - 1 for s in sched.scheduled):
        return None
    return len(sched.scheduled), max(s.num_new_tokens for s in sched.scheduled)


def _warn_if_requantizing(loaded: LoadedModel, config: EngineConfig) -> bool:
    """Log (and return True) when INT4 is asked of projections that arrive as 4-bit GGUF blocks: a second
    rounding onto a coarser grid, which `--quantization gguf` avoids by running the blocks as they are."""
    four_bit = [t for t in loaded.extra.get("gguf_projection_types", ()) if t in ("Q4_0", "Q4_1")]
    if config.quantization != "int4" or not four_bit:
        return False
    logger.warning(
        "%s: the projections are already 4-bit GGUF blocks (%s); --quantization int4 re-quantizes them onto "
        "groups of up to %d, a second rounding (+12-46%% perplexity on the default model, BENCHMARKS.md). "
        "--quantization gguf runs the blocks as they are, at the same size.",
        loaded.source, ", ".join(four_bit), config.quant_group_size,
    )  # fmt: skip
    return True


def _calibration_tokens(loaded: LoadedModel, config: EngineConfig) -> list[int] | None:
    """The calibration text through the model's tokenizer, when AWQ or an fp8 KV cache needs a pass."""
    if not (config.quant_awq or config.kv_cache_dtype == "fp8_e4m3") or loaded.tokenizer_source is None:
        return None
    from stageserve.engine.quant.calibrate import calibration_token_ids
    from stageserve.tokenizer.text_tokenizer import load_tokenizer

    return calibration_token_ids(load_tokenizer(loaded.tokenizer_source), loaded.config.vocab_size)


def _merge(a: RequestOutput | None, b: RequestOutput) -> RequestOutput:
    """One output for several tokens appended in one step (accepted draft tokens plus the bonus)."""
    if a is None:
        return b
    return dataclasses.replace(
        b,
        new_token_ids=a.new_token_ids + b.new_token_ids,
        new_logprobs=a.new_logprobs + b.new_logprobs,
        new_top_logprobs=a.new_top_logprobs + b.new_top_logprobs,
    )
