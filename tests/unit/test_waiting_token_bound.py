"""The engine's waiting queue is bounded in tokens still to compute, not only in requests."""

from __future__ import annotations

import pytest

from stageserve.common.errors import ResourceExhaustedError
from stageserve.engine.config import EngineConfig
from stageserve.engine.kv_cache_manager import KVCacheManager
from stageserve.engine.request import Request, RequestStatus
from stageserve.engine.scheduler import Scheduler
from stageserve.sample.params import SamplingParams


def scheduler(max_waiting_tokens: int) -> Scheduler:
    config = EngineConfig(num_blocks=64, block_size=4, max_waiting_tokens=max_waiting_tokens)
    return Scheduler(config, KVCacheManager(64, 4, True))


def request(request_id: str, num_tokens: int) -> Request:
    return Request(request_id, list(range(1, num_tokens + 1)), SamplingParams(max_tokens=4))


def test_the_waiting_queue_refuses_past_its_token_bound_and_takes_any_request_when_empty():
    s = scheduler(max_waiting_tokens=10)
    s.add(request("long", 25))  # longer than the bound, but the queue was empty: never refused forever
    with pytest.raises(ResourceExhaustedError, match="tokens") as refused:
        s.add(request("more", 1))
    assert refused.value.retry_after_s > 0
    s.finish(s.waiting[0], RequestStatus.FINISHED_ABORTED)  # an abort frees its tokens at once
    s.add(request("a", 8))
    with pytest.raises(ResourceExhaustedError):
        s.add(request("b", 3))  # 8 + 3 > 10
    s.add(request("c", 2))  # 8 + 2 fits
    assert s.waiting_tokens() == 10 and s.num_waiting == 2


def test_zero_means_no_token_bound():
    s = scheduler(max_waiting_tokens=0)
    for i in range(20):
        s.add(request(str(i), 100))
    assert s.num_waiting == 20
