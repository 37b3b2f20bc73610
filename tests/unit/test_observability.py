"""Tracing and metrics pieces that need no cluster: the no-op default, the metrics registry, the plan's
environment and ports, and the client's traceparent check."""

from __future__ import annotations

import pytest

from stageserve.cluster.plan import ClusterConfig, plan_services
from stageserve.common import tracing
from stageserve.common.metrics import Metrics
from stageserve.gateway.client import _trace_metadata

FIELDS = {
    "prefill": frozenset({"model", "engine", "server"}),
    "decode": frozenset({"model", "engine", "server"}),
}


def test_tracing_is_a_noop_without_an_endpoint():
    handle = tracing.configure("gateway", environ={})
    assert not handle.enabled
    handle.shutdown()
    assert not tracing.enabled()
    with tracing.span("work", {"a": 1}) as s:
        s.set_attribute("b", 2)
        s.add_event("e")
        assert tracing.outgoing_metadata() is None  # no sampled span: nothing to propagate
    assert tracing.outgoing_metadata((("k", "v"),)) == (("k", "v"),)


def test_metrics_have_their_own_registry_and_parse():
    parser = pytest.importorskip("prometheus_client.parser")
    a, b = Metrics(), Metrics()  # two in one process: no duplicate-name clash, no shared state
    a.time_to_first_token.observe(0.05)
    a.request_success.labels(finish_reason="stop").inc()
    a.request_errors.labels(code="INTERNAL").inc()

    class Stats:
        num_running, num_waiting = 2, 1

        class kv:
            num_blocks, num_free_blocks = 10, 4

    a.watch_engine(lambda: Stats)
    families = {f.name: f for f in parser.text_string_to_metric_families(a.exposition())}
    ttft = {s.name: s.value for s in families["stageserve:time_to_first_token_seconds"].samples}
    assert ttft["stageserve:time_to_first_token_seconds_count"] == 1
    assert families["stageserve:kv_cache_usage_perc"].samples[0].value == pytest.approx(0.6)
    assert families["stageserve:num_requests_running"].samples[0].value == 2
    assert "stageserve:request_success" in families and "stageserve:request_errors" in families
    assert "time_to_first_token_seconds_count 1.0" not in b.exposition()


def test_up_with_trace_and_metrics_sets_each_services_environment():
    config = ClusterConfig(trace="http://collector:4317", metrics=True)
    specs = plan_services(config, config_fields=lambda role: FIELDS.get(role, frozenset()))
    for spec in specs:
        assert spec.env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"
        assert spec.env["OTEL_SERVICE_NAME"] == spec.role
        assert spec.env["OTEL_RESOURCE_ATTRIBUTES"] == f"service.instance.id={spec.name}"
        assert spec.metrics
    plain = plan_services(ClusterConfig(), config_fields=lambda role: FIELDS.get(role, frozenset()))
    assert all(not s.env and not s.metrics for s in plain)


def test_client_traceparent_is_checked():
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert _trace_metadata(tp) == (("traceparent", tp),)
    assert _trace_metadata(None) is None
    with pytest.raises(ValueError):
        _trace_metadata("00-abc-def-01")
