"""Drive a workload against a gateway and measure each request: `stageserve bench --target HOST:PORT`.

Load is a request rate (Poisson arrivals; inf sends everything at once), a concurrency cap, or both
(vLLM's `--request-rate` and `--max-concurrency`). Latencies are measured at the client, per stream
message: TTFT to the first message with tokens, ITL between later ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable, Sequence

import grpc
import grpc.aio
from tqdm import tqdm

from stageserve.bench.stats import BenchReport, RequestResult, format_table, summarize
from stageserve.bench.workload import BenchRequest, arrival_times, random_requests, sharegpt_requests
from stageserve.gateway.client import GatewayClient
from stageserve.sample.params import SamplingParams

FALLBACK_VOCAB_SIZE = 1000  # random ids below this exist in any real vocabulary


async def measure(
    client: GatewayClient, request: BenchRequest, params: SamplingParams, timeout_s: float | None
) -> RequestResult:
    """Send one request and time its stream."""
    result = RequestResult(prompt_len=request.prompt_len)
    start = last = time.perf_counter()
    if request.prompt_token_ids is not None:
        inputs = {"prompt_token_ids": request.prompt_token_ids}
    else:
        inputs = {"prompt": request.prompt}
    try:
        async for message in client.generate(params=params, logprobs=False, timeout_s=timeout_s, **inputs):
            now = time.perf_counter()
            if message.token_ids:
                if result.ttft_s is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
            if message.finish_reason:
                result.output_tokens = message.usage.completion_tokens
        result.e2e_s = time.perf_counter() - start
    except grpc.aio.AioRpcError as exc:
        result.error = exc.code().name
    return result


async def run_benchmark(
    client: GatewayClient,
    requests: Sequence[BenchRequest],
    params_for: Callable[[BenchRequest], SamplingParams],
    request_rate: float = math.inf,
    concurrency: int | None = None,
    seed: int = 0,
    timeout_s: float | None = None,
    progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send every request on its Poisson schedule, at most `concurrency` at once; the results in request
    order and the wall time of the run."""
    offsets = arrival_times(len(requests), request_rate, seed)
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, unit="req", file=sys.stderr)

    async def one(request: BenchRequest, offset: float) -> RequestResult:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        if limit is None:
            result = await measure(client, request, params_for(request), timeout_s)
        else:
            async with limit:
                result = await measure(client, request, params_for(request), timeout_s)
        bar.update(1)
        return result

    start = time.perf_counter()
    try:
        results = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets, strict=True)))
    finally:
        bar.close()
    return list(results), time.perf_counter() - start


async def bench(args: argparse.Namespace) -> BenchReport:
    async with GatewayClient(args.target) as client:
        if args.dataset:
            requests = sharegpt_requests(args.dataset, args.num_prompts, args.seed, args.output_len)
        else:
            vocab_size = args.vocab_size or await _served_vocab_size(client)
            output_len = args.output_len or 128
            requests = random_requests(
                args.num_prompts, args.input_len, output_len, args.range_ratio, vocab_size, args.seed
            )

        def params_for(request: BenchRequest) -> SamplingParams:
            return SamplingParams(
                max_tokens=request.output_len, temperature=args.temperature, ignore_eos=args.ignore_eos
            )

        results, duration = await run_benchmark(
            client,
            requests,
            params_for,
            request_rate=args.request_rate,
            concurrency=args.concurrency,
            seed=args.seed,
            timeout_s=args.timeout,
            progress=not args.no_progress,
        )
    return summarize(results, duration)


async def _served_vocab_size(client: GatewayClient) -> int:
    models = await client.list_models(timeout_s=10)
    if models and models[0].vocab_size:
        return models[0].vocab_size
    print(f"note: the gateway reports no vocab size; random ids are below {FALLBACK_VOCAB_SIZE}", file=sys.stderr)
    return FALLBACK_VOCAB_SIZE


def cmd_bench(args: argparse.Namespace) -> int:
    report = asyncio.run(bench(args))
    print(json.dumps(report.to_json()) if args.json else format_table(report))
    return 0 if report.completed else 1
