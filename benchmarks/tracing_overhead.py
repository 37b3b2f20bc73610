"""Issue 7 benchmark: what tracing every request (sampling ratio 1.0) costs the service split on CPU.

    python benchmarks/tracing_overhead.py [--rounds 3] [--concurrency 16] [--num-prompts 48] [--json PATH]

Runs `stageserve up`'s processes on the default model with tracing off, then with every span exported
over OTLP/gRPC to a collector in this process (it decodes each export and drops it, as a real collector
would receive it), alternating off/on for `--rounds` rounds so both see the same machine load. Reports
output tok/s and TTFT/ITL p50 of each, and the throughput cost of tracing: 1 - on / off, over the
rounds' totals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import threading
from concurrent import futures
from datetime import datetime, timezone
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from stageserve.bench.stats import summarize
from stageserve.bench.workload import random_requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_split import split  # noqa: E402  (the same cluster set-up and workload runner)


class CountingCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """Receives OTLP span exports and counts the spans."""

    def __init__(self) -> None:
        self.spans = 0
        self.lock = threading.Lock()

    def Export(self, request, context):
        n = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        with self.lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    requests = random_requests(args.num_prompts, args.input_len, args.output_len, 0.0, vocab_size=49152, seed=0)

    collector = CountingCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    endpoint = f"http://127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()

    runs: dict[str, list] = {"off": [], "on": []}
    try:
        for r in range(args.rounds):
            for variant, trace in (("off", None), ("on", endpoint)):
                [(results, wall)] = asyncio.run(split(requests, [args.concurrency], args.worker_threads, trace))
                s = summarize(results, wall)
                runs[variant].append(s)
                print(f"round {r} tracing {variant:3}: {s.output_tokens_per_s:7.2f} tok/s  TTFT p50 "
                      f"{s.ttft.p50 * 1e3:7.1f} ms  ITL p50 {s.itl.p50 * 1e3:6.1f} ms  errors {s.errors}", flush=True)
    finally:
        server.stop(0)

    def total(variant: str) -> float:
        tokens = sum(s.total_output_tokens for s in runs[variant])
        return tokens / sum(s.duration_s for s in runs[variant])

    off, on = total("off"), total("on")
    cost = 1 - on / off
    print(f"\nconcurrency {args.concurrency}, {args.rounds} rounds: tracing off {off:.2f} tok/s, on {on:.2f} tok/s, "
          f"cost {100 * cost:.1f}% (target < 3%); {collector.spans} spans exported")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "tracing_overhead", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "args": {k: str(v) for k, v in vars(args).items()},
            "off": [s.to_json() for s in runs["off"]], "on": [s.to_json() for s in runs["on"]],
            "off_tok_s": off, "on_tok_s": on, "cost": cost, "spans_exported": collector.spans,
        }, indent=2))


if __name__ == "__main__":
    main()
