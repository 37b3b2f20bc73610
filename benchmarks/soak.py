"""Soak: a whole cluster (`stageserve up`'s processes) held at saturation for N minutes on CPU.

Reports, per window of `--window-s` seconds: requests completed, errors by status, p50/p99 end-to-end
latency; and per service the resident set size (VmRSS) sampled every window. The verdict compares the
first full window after warm-up with the last: p99 latency drift (%) and RSS growth (%) per service.
Targets (issue 8): 0 errors, RSS growth under 5 %.

    nice -n 10 .venv/bin/python benchmarks/soak.py --minutes 10 --out benchmarks/results/soak
    .venv/bin/python benchmarks/soak.py --smoke          # 20 s, to check it runs

Saturation: `--concurrency` closed-loop clients, each sending its next request as soon as the last
ends, with more clients than the decode batch drains at once, so the gateway queue never empties.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import grpc.aio

from stageserve.cluster.plan import ClusterConfig, plan_services
from stageserve.cluster.supervisor import Cluster
from stageserve.gateway.client import build_request
from stageserve.sample.params import SamplingParams
from stageserve.v1 import gateway_pb2_grpc

WORDS = "the of and to in is was for on that with as by at from his her an were which this be are had".split()


def rss_kib(pid: int | None) -> int:
    """VmRSS of `pid` in KiB (0 if it is gone)."""
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def client_loop(stub, rng: random.Random, stop_at: float, max_tokens: int, record) -> None:
    """One closed-loop client: prompts of 8-64 words, greedy, `max_tokens` each, until `stop_at`."""
    while time.monotonic() < stop_at:
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 64)))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.monotonic()
        code = "OK"
        try:
            tokens = 0
            async for message in stub.Generate(build_request(prompt, params=params), timeout=120):
                tokens += len(message.token_ids)
            if tokens != max_tokens:
                code = f"SHORT({tokens})"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                await asyncio.sleep(0.1)  # honour "try later"; counted, but not as a failure
        record(code, time.monotonic() - start)


async def soak(cluster: Cluster, args) -> dict:
    names = list(cluster.names)
    windows: list[dict] = []
    current: dict = {"latencies": [], "codes": Counter()}

    def record(code: str, seconds: float) -> None:
        current["codes"][code] += 1
        if code == "OK":
            current["latencies"].append(seconds)

    start = time.monotonic()
    stop_at = start + args.minutes * 60
    async with grpc.aio.insecure_channel(cluster.address("gateway-0")) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        clients = [
            asyncio.ensure_future(client_loop(stub, random.Random(i), stop_at, args.max_tokens, record))
            for i in range(args.concurrency)
        ]
        while time.monotonic() < stop_at:
            await asyncio.sleep(min(args.window_s, max(0.0, stop_at - time.monotonic())))
            window, current = current, {"latencies": [], "codes": Counter()}
            lat = window["latencies"]
            row = {
                "t_s": round(time.monotonic() - start, 1),
                "completed": len(lat),
                "codes": dict(window["codes"]),
                "p50_s": round(percentile(lat, 0.50), 4),
                "p99_s": round(percentile(lat, 0.99), 4),
                "rss_kib": {n: rss_kib(cluster.pid(n)) for n in names},
            }
            windows.append(row)
            print(f"[{row['t_s']:7.1f} s] done {row['completed']:4d}  codes {row['codes']}  "
                  f"p50 {row['p50_s']:.3f} s  p99 {row['p99_s']:.3f} s  "
                  f"rss MiB {' '.join(f'{n}={v / 1024:.0f}' for n, v in row['rss_kib'].items())}", flush=True)
        await asyncio.gather(*clients)
    return summarize(windows, names, args, exited=cluster.exited())


def summarize(windows: list[dict], names: list[str], args, exited) -> dict:
    """First full window after warm-up vs the last one."""
    warm = [w for w in windows if w["t_s"] > args.warmup_s] or windows
    first, last = warm[0], warm[-1]
    codes = Counter()
    for w in windows:
        codes.update(w["codes"])
    errors = {c: n for c, n in codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")}
    rss_growth = {
        n: round(100.0 * (last["rss_kib"][n] - first["rss_kib"][n]) / first["rss_kib"][n], 2)
        if first["rss_kib"][n] else None
        for n in names
    }
    p99s = [w["p99_s"] for w in warm if w["completed"]]
    times = [w["t_s"] for w in warm if w["completed"]]
    return {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "model": args.model or "default",
        "requests_ok": codes["OK"],
        "resource_exhausted": codes["RESOURCE_EXHAUSTED"],
        "errors": errors,
        "throughput_rps": round(codes["OK"] / (args.minutes * 60), 2),
        "p99_first_s": first["p99_s"],
        "p99_last_s": last["p99_s"],
        "p99_drift_pct": round(100.0 * (last["p99_s"] - first["p99_s"]) / first["p99_s"], 1) if first["p99_s"] else None,
        "p99_median_s": round(statistics.median(p99s), 4) if p99s else None,
        "p99_range_s": [min(p99s), max(p99s)] if p99s else None,
        "p99_trend_pct": trend_pct(times, p99s),
        "rss_first_mib": {n: round(first["rss_kib"][n] / 1024, 1) for n in names},
        "rss_last_mib": {n: round(last["rss_kib"][n] / 1024, 1) for n in names},
        "rss_growth_pct": rss_growth,
        "exited_services": exited,
        "windows": windows,
    }


def trend_pct(times: list[float], values: list[float]) -> float | None:
    """Least-squares slope of `values` over `times`, as % of their mean over the whole span: a drift
    figure that one noisy window (on a shared machine) moves less than first-vs-last does."""
    if len(values) < 3:
        return None
    mt, mv = statistics.fmean(times), statistics.fmean(values)
    slope = sum((t - mt) * (v - mv) for t, v in zip(times, values)) / sum((t - mt) ** 2 for t in times)
    return round(100.0 * slope * (times[-1] - times[0]) / mv, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=24, help="closed-loop clients")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--window-s", type=float, default=30.0, help="seconds per reported window")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="windows ending before this are warm-up")
    parser.add_argument("--model", default=None, help="default model unless given (e.g. dummy:smollm2-135m)")
    parser.add_argument("--num-blocks", type=int, default=512, help="KV blocks per engine")
    parser.add_argument("--out", default=None, help="directory for soak.json")
    parser.add_argument("--smoke", action="store_true", help="20 s with small windows: does it run?")
    parser.add_argument("--from-json", default=None, help="only summarize the windows of an earlier run's soak.json")
    args = parser.parse_args(argv)
    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        for key in ("minutes", "concurrency", "max_tokens"):
            setattr(args, key, earlier[key])
        windows = earlier["windows"]
        result = summarize(windows, list(windows[0]["rss_kib"]), args, exited=earlier["exited_services"])
        print(json.dumps({k: v for k, v in result.items() if k != "windows"}, indent=2))
        return 0
    if args.smoke:
        args.minutes, args.window_s, args.warmup_s, args.concurrency, args.max_tokens = 1 / 3, 5.0, 0.0, 8, 8
    engine = {"engine": {"num_blocks": args.num_blocks}}
    config = ClusterConfig(model=args.model, gateway_port=0, startup_timeout_s=300)
    specs = plan_services(config, {"prefill": engine, "decode": engine})
    with Cluster(specs, output=io.StringIO(), startup_timeout_s=300, grace_s=10) as cluster:
        cluster.start()
        cluster.wait_ready()
        result = asyncio.run(soak(cluster, args))
    brief = {k: v for k, v in result.items() if k != "windows"}
    print(json.dumps(brief, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(result, indent=2))
    return 0 if not result["errors"] and not result["exited_services"] else 1


if __name__ == "__main__":
    sys.exit(main())
