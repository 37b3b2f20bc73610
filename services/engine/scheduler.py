"""Iteration-level scheduling by token budget.

There are no prefill and decode phases here. Each step has a budget of `max_num_batched_tokens`,
and each request asks for `num_tokens - num_computed_tokens` of it. Running requests are served
first, in arrival order, so a decode (one token) is never starved by a long prompt; what budget
remains admits waiting requests, whose prompts are cut into chunks that fit (chunked prefill). A
prefix-cache hit simply starts a request with `num_computed_tokens` already advanced. Draft tokens
to verify (`spec_token_ids`) ride on the same rule: a speculating decode asks for 1 + k tokens, and
when the budget is short its draft is cut rather than its real tokens.

When the KV pool cannot grow a running request, the most recently admitted running request is
preempted: its blocks are freed and it goes back to the front of the waiting queue, to be recomputed
later (cheaply, if its blocks are still in the prefix cache). The oldest request can always make
progress, because no request is admitted that needs more blocks than the whole pool, so preemption
cannot deadlock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from stageserve.common.errors import ResourceExhaustedError
from stageserve.engine.config import EngineConfig
from stageserve.engine.kv_cache_manager import KVCacheManager
from stageserve.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[int]


@dataclass
class SchedulerOutput:
    """What one step computes: requests in batch order, each with how many new tokens."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_waiting = 0  # live requests in `waiting`; aborted ones are skipped lazily

    def check_capacity(self, num_tokens: int = 0) -> None:
        """Refuse (RESOURCE_EXHAUSTED, retry later) a request the waiting queue has no room for."""
        if self.num_waiting >= self.config.max_waiting:
            raise ResourceExhaustedError(f"waiting queue is full ({self.config.max_waiting} requests)", retry_after_s=0.5)
        limit = self.config.max_waiting_tokens
        if limit and self.num_waiting and self.waiting_tokens() + num_tokens > limit:
            raise ResourceExhaustedError(f"waiting queue is full ({limit} tokens to compute)", retry_after_s=0.5)

    def waiting_tokens(self) -> int:
        """Tokens still to compute over the waiting requests (O(waiting), which max_waiting bounds)."""
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting if not r.is_finished)

    def add(self, request: Request) -> None:
        self.check_capacity(request.num_tokens - request.num_computed_tokens)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.num_waiting += 1

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            gap = request.num_tokens - request.num_computed_tokens
            num_new = min(gap + len(request.spec_token_ids), budget)
            del request.spec_token_ids[max(num_new - gap, 0) :]
            block_ids = self._allocate_or_preempt(request, num_new, out)
            if block_ids is None:  # it preempted itself: nothing after it can run either
                break
            out.scheduled.append(ScheduledRequest(request, num_new, block_ids))
            budget -= num_new
            i += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> list[int] | None:
        while (block_ids := self.kv.allocate_slots(request, num_new)) is None:
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return None
        return block_ids

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.is_finished:  # aborted while waiting
                self.waiting.popleft()
                continue
            hits = self.kv.get_computed_blocks(request) if request.num_computed_tokens == 0 else []
            num_cached = len(hits) * self.kv.block_size
            num_new = min(request.num_tokens - request.num_computed_tokens - num_cached, budget)
            block_ids = self.kv.allocate_slots(request, num_new, hits)
            if block_ids is None:
                if not self.running and self._reclaim_from_waiters(out):
                    continue  # retry the head with the blocks a waiter behind it gave back
                break
            self.waiting.popleft()
            self.num_waiting -= 1
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens += num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, block_ids))
            budget -= num_new

    def _reclaim_from_waiters(self, out: SchedulerOutput) -> bool:
        """Preempt (by recompute) the last waiter that holds blocks; True if one did.

        Only when nothing runs: then no running sequence will ever free a block, and an attached
        request (decode: its KV arrived, so it waits holding blocks) behind a head that cannot be
        allocated would otherwise hold the pool forever while the engine steps on nothing.
        """
        for request in reversed(self.waiting):
            if request is self.waiting[0] or request.is_finished or not self.kv.block_ids(request.request_id):
                continue
            self.kv.free(request)
            request.status = RequestStatus.PREEMPTED
            request.num_computed_tokens = 0
            request.num_preemptions += 1
            out.preempted.append(request)
            return True
        return False

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        self.num_waiting += 1

    def finish(self, request: Request, status: RequestStatus, free_blocks: bool = True) -> None:
        """End a request in any state; its blocks are freed at once unless the caller holds them."""
        if request.is_finished:
            return
        was_waiting = request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        request.status = status
        if free_blocks:
            self.kv.free(request)
        if was_waiting:
            self.num_waiting -= 1  # its queue entry is skipped when it reaches the front

    def remove_finished(self) -> None:
        if any(r.is_finished for r in self.running):
            self.running = [r for r in self.running if not r.is_finished]
