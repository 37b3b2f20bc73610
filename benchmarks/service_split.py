"""Issue 3 benchmark: what the service split costs against the in-process engine, same workload, same run.

    python benchmarks/service_split.py [--concurrency 1,16] [--num-prompts 64] [--input-len 64] [--output-len 32]

At concurrency 1 the machine is idle between requests, so the TTFT difference is the split's own cost
(the extra hops: Reserve, Prefill, the KV transfer, Attach). At 16 both sides also queue for the cores.

Both sides run the default model on this machine's CPU with the same engine settings: the in-process
engine with 2 torch threads; the split as one process per service (tokenizer, prefill, decode, gateway)
with --worker-threads torch threads each for prefill and decode (1: the two share the cores as the
in-process engine does; 2: each has what the in-process engine has, which isolates the hops at low load). The client measures TTFT
(first token) and ITL per request; throughput is output tokens over the run's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from stageserve.bench.runner import run_benchmark
from stageserve.bench.stats import RequestResult, summarize
from stageserve.bench.workload import random_requests
from stageserve.cluster.plan import ClusterConfig, plan_services
from stageserve.cluster.supervisor import Cluster
from stageserve.engine.config import EngineConfig
from stageserve.engine.factory import create_engine
from stageserve.engine.worker import EngineWorker
from stageserve.gateway.client import GatewayClient
from stageserve.sample.params import SamplingParams

ENGINE = {"num_blocks": 1024, "max_num_seqs": 64, "max_num_batched_tokens": 512}


def params(output_len: int) -> SamplingParams:
    return SamplingParams(max_tokens=output_len, min_tokens=output_len, temperature=0.0)


async def in_process(requests, concurrencies: list[int]) -> list[tuple[list[RequestResult], float]]:
    engine = create_engine(None, EngineConfig(device="cpu", dtype="float32", **ENGINE))
    engine.warmup()
    worker = EngineWorker(engine)
    worker.start()
    runs = []

    async def one(i, request, limit) -> RequestResult:
        async with limit:
            result = RequestResult(prompt_len=request.prompt_len)
            start = last = time.perf_counter()
            add = lambda e: e.add_request(f"r{i}", list(request.prompt_token_ids), params(request.output_len))
            async for batch in worker.stream(f"r{i}", add):
                now = time.perf_counter()
                if result.ttft_s is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
                result.output_tokens += sum(len(o.new_token_ids) for o in batch)
            result.e2e_s = time.perf_counter() - start
            return result

    for concurrency in concurrencies:
        limit = asyncio.Semaphore(concurrency)
        start = time.perf_counter()
        results = await asyncio.gather(*(one(i, r, limit) for i, r in enumerate(requests)))
        runs.append((list(results), time.perf_counter() - start))
    await worker.stop()
    return runs


async def split(
    requests, concurrencies: list[int], worker_threads: int, trace: str | None = None
) -> list[tuple[list[RequestResult], float]]:
    """The same workload through `stageserve up`'s processes; `trace` exports every span to that OTLP endpoint."""
    engine_table = {"engine": dict(ENGINE)}
    specs = plan_services(ClusterConfig(gateway_port=0, trace=trace), {"prefill": engine_table, "decode": engine_table})
    env = {**os.environ, "OMP_NUM_THREADS": str(worker_threads), "OTEL_TRACES_SAMPLER": "parentbased_always_on"}
    cluster = Cluster(specs, output=io.StringIO(), env=env)
    try:
        cluster.start()
        cluster.wait_ready()
        async with GatewayClient(cluster.address("gateway-0")) as client:
            await run_benchmark(client, requests[:2], lambda r: params(r.output_len), progress=False)  # warm-up
            return [
                await run_benchmark(client, requests, lambda r: params(r.output_len), concurrency=c, progress=False)
                for c in concurrencies
            ]
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated concurrencies")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads of each prefill/decode process")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    requests = random_requests(args.num_prompts, args.input_len, args.output_len, 0.0, vocab_size=49152, seed=0)

    local_runs = asyncio.run(in_process(requests, concurrencies))
    split_runs = asyncio.run(split(requests, concurrencies, args.worker_threads))
    report = []
    print(f"{'conc':>4} {'metric':16} {'in-process':>11} {'split':>11} {'split - in-process':>19}")
    for c, (lr, lw), (sr, sw) in zip(concurrencies, local_runs, split_runs):
        local, remote = summarize(lr, lw), summarize(sr, sw)
        rows = {
            "ttft_p50_ms": (local.ttft.p50 * 1e3, remote.ttft.p50 * 1e3),
            "ttft_p90_ms": (local.ttft.p90 * 1e3, remote.ttft.p90 * 1e3),
            "itl_p50_ms": (local.itl.p50 * 1e3, remote.itl.p50 * 1e3),
            "output_tok_s": (local.output_tokens_per_s, remote.output_tokens_per_s),
            "errors": (local.errors, remote.errors),
        }
        for name, (a, b) in rows.items():
            print(f"{c:4} {name:16} {a:11.2f} {b:11.2f} {b - a:19.2f}")
        loss = 1 - rows["output_tok_s"][1] / rows["output_tok_s"][0]
        print(f"{c:4} throughput loss {100 * loss:.1f}%")
        report.append({"concurrency": c, "in_process": local.to_json(), "split": remote.to_json(),
                       "added_ttft_p50_ms": rows["ttft_p50_ms"][1] - rows["ttft_p50_ms"][0], "throughput_loss": loss})
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "service_split", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "args": {k: str(v) for k, v in vars(args).items()},
            "runs": report,
        }, indent=2))


if __name__ == "__main__":
    main()
