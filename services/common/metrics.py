"""Prometheus metrics of one stage process, in a registry of its own, served over HTTP.

    metrics = Metrics()                                    # one per process; passed to whoever records
    metrics.time_to_first_token.observe(0.12)
    metrics.watch_engine(lambda: engine.stats())           # gauges read at each scrape
    stop = serve_metrics(metrics, host, port)               # ServerConfig.metrics_port; 0: not served

Names follow vLLM's, with the `stageserve:` prefix. prometheus-client is optional (the `tracing`
extra): without it every metric is a no-op and nothing is served. GPU utilisation, memory and power
come from nvidia-ml-py when it is importable and a GPU is there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "stageserve:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
BYTES_BUCKETS = tuple(float(4**i * 1024) for i in range(12))  # 1 KiB .. 4 GiB

try:  # optional: the `tracing` extra
    from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # pragma: no cover - exercised on images without the extra
    CollectorRegistry = None


class _Noop:
    """Accepts every metric call and records nothing (prometheus-client missing)."""

    def labels(self, *args: Any, **kwargs: Any) -> _Noop:
        return self

    def observe(self, value: float) -> None: ...
    def inc(self, amount: float = 1) -> None: ...


class Metrics:
    """Every metric a stage records. Each process makes one and hands it to its servicers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if CollectorRegistry is not None else None

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Any:
            return Histogram(PREFIX + name, doc, registry=self.registry, buckets=buckets) if self.registry else _Noop()

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Counter(PREFIX + name, doc, labels, registry=self.registry) if self.registry else _Noop()

        # gateway
        self.time_to_first_token = histogram("time_to_first_token_seconds", "arrival to the first token")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "time between streamed tokens")
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "arrival to the last token")
        self.request_queue_time = histogram("request_queue_time_seconds", "time waiting for admission")
        self.request_success = counter("request_success", "requests finished, by reason", ("finish_reason",))
        self.request_errors = counter("request_errors", "requests failed, by gRPC status", ("code",))
        # prefill and decode
        self.prefill_time = histogram("prefill_time_seconds", "one prompt's prefill, queueing included")
        self.decode_time = histogram("decode_time_seconds", "one sequence's decode, attach to finish")
        self.kv_transfer_time = histogram("kv_transfer_seconds", "one request's KV transfer")
        self.kv_transfer_bytes = histogram("kv_transfer_bytes", "one request's KV transfer size", BYTES_BUCKETS)
        self.prefix_cache_queries = counter("prefix_cache_queries", "prompt tokens looked up in the prefix cache")
        self.prefix_cache_hits = counter("prefix_cache_hits", "prompt tokens found in the prefix cache")

    def watch_engine(self, stats: Callable[[], Any]) -> None:
        """Report num_requests_running / _waiting and kv_cache_usage_perc from `stats()` (EngineStats) at
        each scrape. `stats` runs on the HTTP server's thread, racing the engine; a failed read is skipped."""
        if self.registry is not None:
            self.registry.register(_EngineCollector(stats))

    def watch_speculation(self, counters: Callable[[], Any]) -> None:
        """Report speculative decoding totals from `counters()` (SpecCounters, or None when off) at each scrape."""
        if self.registry is not None:
            self.registry.register(_SpecCollector(counters))

    def watch_gpu(self) -> None:
        """Report GPU utilisation, memory and power via nvidia-ml-py, if it imports and finds a GPU."""
        if self.registry is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() == 0:
                return
        except Exception as exc:  # ImportError, or NVMLError without a driver: no GPU metrics
            logger.debug("no GPU metrics: %s", exc)
            return
        self.registry.register(_GpuCollector(pynvml))

    def exposition(self) -> str:
        """The text format a scrape returns (for tests and debugging)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode() if self.registry else ""


class _EngineCollector:
    def __init__(self, stats: Callable[[], Any]):
        self.stats = stats
        self.last: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def collect(self) -> Iterator[Any]:
        try:
            s = self.stats()
            used = 1.0 - s.kv.num_free_blocks / s.kv.num_blocks if s.kv.num_blocks else 0.0
            self.last = (float(s.num_running), float(s.num_waiting), used)
        except RuntimeError as exc:  # e.g. a dict resized mid-read by the engine thread: report the last values
            logger.debug("engine stats skipped: %s", exc)
        for name, doc, value in zip(
            ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"),
            ("sequences in the running batch", "sequences waiting to be scheduled", "fraction of KV blocks in use"),
            self.last,
        ):
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)


class _SpecCollector:
    def __init__(self, counters: Callable[[], Any]):
        self.counters = counters

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        c = self.counters()
        if c is None:
            return
        for name, doc, value in (
            ("spec_decode_num_draft_tokens", "draft tokens proposed and verified", c.proposed),
            ("spec_decode_num_accepted_tokens", "draft tokens accepted", c.accepted),
            ("spec_decode_num_bonus_tokens", "tokens the target added after the accepted drafts", c.verifications),
            ("spec_decode_num_draft_unavailable", "sequence-steps without a proposal (draft failed or down)",
             c.draft_unavailable),
        ):  # fmt: skip
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        yield GaugeMetricFamily(PREFIX + "spec_decode_acceptance_rate", "accepted / proposed", value=c.acceptance_rate)
        yield GaugeMetricFamily(
            PREFIX + "spec_decode_mean_accepted_length", "tokens per verifying step (accepted + bonus)",
            value=c.mean_accepted_length,
        )


class _GpuCollector:
    def __init__(self, pynvml: Any):
        self.nvml = pynvml

    def collect(self) -> Iterator[Any]:
        nvml = self.nvml
        util = GaugeMetricFamily(PREFIX + "gpu_utilization_perc", "GPU busy fraction", labels=["gpu"])
        memory = GaugeMetricFamily(PREFIX + "gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        power = GaugeMetricFamily(PREFIX + "gpu_power_watts", "GPU power draw", labels=["gpu"])
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            util.add_metric([str(i)], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            memory.add_metric([str(i)], float(nvml.nvmlDeviceGetMemoryInfo(handle).used))
            power.add_metric([str(i)], nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        yield from (util, memory, power)


def serve_metrics(metrics: Metrics, host: str, port: int) -> Callable[[], None]:
    """Serve `metrics` at http://host:port/metrics on a daemon thread; returns the function that stops it.
    Port 0, or no prometheus-client, serves nothing."""
    if port == 0 or metrics.registry is None:
        return lambda: None
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    logger.info("metrics on http://%s:%d/metrics", host, server.server_port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(1.0)

    return stop
