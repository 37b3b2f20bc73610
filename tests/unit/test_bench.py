"""The benchmark's pure parts: percentiles and the report, workload generation, arrival times, and the
runner's load shaping against a fake client (no gRPC server)."""

from __future__ import annotations

import asyncio
import json
import math
import statistics

import grpc
import grpc.aio
import numpy as np
import pytest

from stageserve.bench.runner import run_benchmark
from stageserve.bench.stats import LatencySummary, RequestResult, format_table, percentile, summarize
from stageserve.bench.workload import (
    BenchRequest,
    arrival_times,
    length_range,
    random_requests,
    sharegpt_requests,
)
from stageserve.common.errors import InvalidArgumentError
from stageserve.sample.params import SamplingParams
from stageserve.v1 import common_pb2, gateway_pb2

# ---- stats -----------------------------------------------------------------------------------------


RANDOM_VALUES = list(np.random.default_rng(0).random(101))


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], RANDOM_VALUES])
@pytest.mark.parametrize("q", [0, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases():
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    assert LatencySummary.of([]) == LatencySummary(0, None, None, None, None)
    summary = LatencySummary.of([0.1, 0.2, 0.3, 0.4])
    assert summary.count == 4 and summary.mean == pytest.approx(0.25) and summary.p50 == pytest.approx(0.25)


def test_summarize_counts_only_completed_requests():
    results = [
        RequestResult(prompt_len=10, output_tokens=5, ttft_s=0.1, itl_s=[0.02, 0.04], e2e_s=0.5),
        RequestResult(prompt_len=20, output_tokens=3, ttft_s=0.3, itl_s=[0.06], e2e_s=0.7),
        RequestResult(prompt_len=30, error="UNAVAILABLE"),
        RequestResult(prompt_len=30, error="UNAVAILABLE"),
        RequestResult(prompt_len=30, ttft_s=0.2, error="DEADLINE_EXCEEDED"),
    ]
    report = summarize(results, duration_s=2.0)
    assert (report.num_requests, report.completed, report.errors) == (5, 2, 3)
    assert report.error_kinds == {"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1}
    assert report.requests_per_s == pytest.approx(1.0)
    assert report.output_tokens_per_s == pytest.approx(4.0)
    assert (report.total_input_tokens, report.total_output_tokens) == (30, 8)
    assert report.ttft.count == 2 and report.ttft.mean == pytest.approx(0.2)
    assert report.itl.count == 3 and report.itl.p50 == pytest.approx(0.04)
    assert report.e2e.p50 == pytest.approx(0.6)
    assert report.tpot.mean == pytest.approx(statistics.mean([(0.5 - 0.1) / 4, (0.7 - 0.3) / 2]))

    as_json = json.loads(json.dumps(report.to_json()))  # plain JSON types all the way down
    assert as_json["ttft"]["p99"] == pytest.approx(report.ttft.p99)
    table = format_table(report)
    for row in ("TTFT", "ITL", "E2E", "requests/s", "output tokens/s", "UNAVAILABLE: 2"):
        assert row in table


def test_summarize_of_nothing_is_empty_not_an_error():
    report = summarize([], duration_s=0.0)
    assert report.completed == 0 and report.requests_per_s == 0.0 and report.ttft.p50 is None
    assert "-" in format_table(report)


def test_tpot_needs_two_tokens():
    assert RequestResult(1, output_tokens=1, ttft_s=0.1, e2e_s=0.1).tpot_s is None
    assert RequestResult(1, output_tokens=3, ttft_s=0.1, e2e_s=0.5).tpot_s == pytest.approx(0.2)


# ---- workloads -------------------------------------------------------------------------------------


def test_random_requests_are_seeded_and_within_range():
    a = random_requests(200, input_len=100, output_len=20, range_ratio=0.5, vocab_size=300, seed=1)
    b = random_requests(200, input_len=100, output_len=20, range_ratio=0.5, vocab_size=300, seed=1)
    c = random_requests(200, input_len=100, output_len=20, range_ratio=0.5, vocab_size=300, seed=2)
    assert a == b and a != c
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.output_len <= 30 for r in a)
    assert all(len(r.prompt_token_ids) == r.prompt_len and r.prompt is None for r in a)
    assert all(0 <= t < 300 for r in a for t in r.prompt_token_ids)
    assert len({r.prompt_len for r in a}) > 20  # actually spread


def test_random_requests_without_spread_have_exact_lengths():
    requests = random_requests(5, input_len=7, output_len=3, range_ratio=0.0, vocab_size=10)
    assert [(r.prompt_len, r.output_len) for r in requests] == [(7, 3)] * 5


def test_length_range_bounds():
    assert length_range(100, 0.0) == (100, 100)
    assert length_range(100, 0.25) == (75, 125)
    assert length_range(1, 0.9) == (1, 2)
    with pytest.raises(InvalidArgumentError, match="range_ratio"):
        length_range(10, 1.0)
    with pytest.raises(InvalidArgumentError, match="vocab_size"):
        random_requests(1, 10, 10, 0.0, vocab_size=0)


def write_sharegpt(tmp_path, entries) -> str:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    return str(path)


def conversation(prompt: str, reply: str) -> dict:
    return {"id": prompt[:8], "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]}


def test_sharegpt_takes_first_turns_and_filters_like_vllm(tmp_path):
    long_prompt = "word " * 2000
    entries = [
        conversation("Tell me about foxes, please, in detail.", "Foxes are small omnivores of the dog family."),
        conversation("hi", "Hello! How can I help you today, friend?"),  # prompt too short
        conversation("Explain gravity to a child in two lines.", "ok"),  # reply too short
        conversation(long_prompt, "A long answer to a long question, indeed."),  # prompt too long
        {"id": "one-turn", "conversations": [{"from": "human", "value": "Only a question, no answer here."}]},
        "not a conversation",
    ]
    path = write_sharegpt(tmp_path, entries)
    requests = sharegpt_requests(path, num_prompts=10, seed=0)
    assert [r.prompt for r in requests] == ["Tell me about foxes, please, in detail."]
    [r] = requests
    assert r.prompt_token_ids is None and r.prompt_len == math.ceil(len(r.prompt) / 4)
    assert r.output_len == math.ceil(len("Foxes are small omnivores of the dog family.") / 4)

    # A fixed output length keeps the short reply; an exact counter replaces the estimate.
    fixed = sharegpt_requests(path, num_prompts=10, seed=0, output_len=7, count_tokens=lambda s: len(s.split()))
    assert sorted(r.prompt for r in fixed) == sorted(
        ["Tell me about foxes, please, in detail.", "hi", "Explain gravity to a child in two lines."]
    )
    assert all(r.output_len == 7 for r in fixed)


def test_sharegpt_sampling_is_seeded_and_bounded(tmp_path):
    entries = [
        conversation(f"Question number {i} about something?", f"Answer number {i} to it, at length.") for i in range(50)
    ]
    path = write_sharegpt(tmp_path, entries)
    a = sharegpt_requests(path, num_prompts=10, seed=3)
    assert len(a) == 10 and a == sharegpt_requests(path, num_prompts=10, seed=3)
    assert a != sharegpt_requests(path, num_prompts=10, seed=4)


def test_sharegpt_bad_files_name_the_dataset(tmp_path):
    with pytest.raises(InvalidArgumentError, match="dataset"):
        sharegpt_requests(tmp_path / "missing.json", 5)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="dataset"):
        sharegpt_requests(tmp_path / "bad.json", 5)
    with pytest.raises(InvalidArgumentError, match="dataset"):
        sharegpt_requests(write_sharegpt(tmp_path, {"a": 1}), 5)
    with pytest.raises(InvalidArgumentError, match="no conversation"):
        sharegpt_requests(write_sharegpt(tmp_path, [conversation("hi", "ok")]), 5)


def test_arrival_times_are_poisson():
    assert arrival_times(4, math.inf) == [0.0] * 4
    times = arrival_times(4000, request_rate=20.0, seed=0)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:]))
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.1)
    assert gaps.std() == pytest.approx(1 / 20, rel=0.1)  # exponential: std equals mean
    assert times == arrival_times(4000, request_rate=20.0, seed=0)
    with pytest.raises(InvalidArgumentError, match="request_rate"):
        arrival_times(3, 0.0)


# ---- runner ----------------------------------------------------------------------------------------


class FakeClient:
    """Streams `output_len` tokens in messages of two; fails prompts of length 13 with UNAVAILABLE."""

    def __init__(self):
        self.in_flight = self.max_in_flight = 0
        self.params: list[SamplingParams] = []

    async def generate(self, *, params, logprobs, timeout_s, prompt_token_ids=None, prompt=None):
        self.params.append(params)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if prompt_token_ids is not None and len(prompt_token_ids) == 13:
                metadata = grpc.aio.Metadata()
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, "no decode")
            sent = 0
            while sent < params.max_tokens:
                await asyncio.sleep(0.001)
                ids = list(range(sent, min(sent + 2, params.max_tokens)))
                sent += len(ids)
                message = gateway_pb2.GenerateResponse(token_ids=ids)
                if sent == params.max_tokens:
                    message.finish_reason = common_pb2.FINISH_REASON_LENGTH
                    message.usage.completion_tokens = sent
                yield message
        finally:
            self.in_flight -= 1


def test_runner_caps_concurrency_and_measures_each_stream():
    requests = [BenchRequest(4, 6, prompt_token_ids=(1, 2, 3, 4)) for _ in range(12)]
    requests.append(BenchRequest(13, 6, prompt_token_ids=tuple(range(13))))
    client = FakeClient()

    async def body():
        return await run_benchmark(
            client, requests, lambda r: SamplingParams(max_tokens=r.output_len), concurrency=3, progress=False
        )

    results, duration = asyncio.run(body())
    assert client.max_in_flight == 3 and duration > 0
    assert all(p.max_tokens == 6 for p in client.params)
    ok = results[:12]
    assert all(r.ok and r.output_tokens == 6 and len(r.itl_s) == 2 for r in ok)
    assert all(0 < r.ttft_s <= r.e2e_s for r in ok)
    assert results[12].error == "UNAVAILABLE" and results[12].e2e_s is None
    assert summarize(results, duration).errors == 1


def test_runner_spreads_requests_at_the_request_rate():
    requests = [BenchRequest(4, 2, prompt_token_ids=(1, 2, 3, 4)) for _ in range(20)]

    async def body():
        return await run_benchmark(
            FakeClient(), requests, lambda r: SamplingParams(max_tokens=2), request_rate=200.0, progress=False
        )

    _, duration = asyncio.run(body())
    expected = arrival_times(20, 200.0)[-1]
    assert duration >= expected
