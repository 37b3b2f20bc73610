"""Tracing and metrics end to end: a cluster started with `--trace` and `--metrics`, an OTLP receiver in
this process, and one streamed generation carrying the client's W3C traceparent.

The spans must form one trace, the client's, as a tree rooted at the client's span, covering every
stage; every service's /metrics must parse and show the request.
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

from stageserve.cluster.plan import ClusterConfig, plan_services  # noqa: E402
from stageserve.cluster.supervisor import Cluster  # noqa: E402
from stageserve.gateway.client import GatewayClient  # noqa: E402
from stageserve.sample.params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow

ENGINE = {"engine": {"num_blocks": 64, "max_num_batched_tokens": 128}}
# Decode samples through the Sample service, speculates with the ngram draft service, and traces each
# step (the verbose level).
DECODE = {**ENGINE, "trace_steps": True}
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps every span it is sent, with its service's name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self.spans += [(attrs.get("service.name", ""), s) for s in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[tuple[str, object]]:
        with self.lock:
            return list(self.spans)


@pytest.fixture(scope="module")
def receiver():
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collector, f"http://127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def cluster(receiver):
    config = ClusterConfig(
        gateway_port=0, trace=receiver[1], metrics=True, sampler="remote", speculative="ngram", startup_timeout_s=240
    )
    specs = plan_services(config, {"prefill": ENGINE, "decode": DECODE})
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_TRACES_SAMPLER": "parentbased_always_on"}
    c = Cluster(specs, output=io.StringIO(), startup_timeout_s=240, grace_s=5, env=env)
    c.start()
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


async def generate(address: str, prompt: str, traceparent: str | None = None) -> list[int]:
    async with GatewayClient(address) as client:
        tokens: list[int] = []
        async for message in client.generate(prompt, params=PARAMS, traceparent=traceparent):
            tokens += list(message.token_ids)
        return tokens


def wait_for_spans(receiver: Receiver, trace_id: bytes, names: set[str], timeout_s: float = 15.0) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        spans = [(svc, s) for svc, s in receiver.snapshot() if s.trace_id == trace_id]
        if names <= {s.name for _, s in spans} or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


def test_one_generation_is_one_trace_rooted_at_the_client_span(cluster, receiver):
    collector, _ = receiver
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    tokens = asyncio.run(generate(cluster.address("gateway-0"), "The capital of France is", f"00-{trace_id}-{client_span}-01"))
    assert len(tokens) == PARAMS.max_tokens

    expected = {
        "stageserve.v1.Gateway/Generate", "tokenize", "stageserve.v1.Tokenizer/Tokenize", "gateway.queue",
        "decode.reserve", "prefill", "stageserve.v1.Prefill/Prefill", "prefill.compute", "kv_transfer",
        "stageserve.v1.Decode/PushKV", "stageserve.v1.Decode/Attach", "detokenize", "stageserve.v1.Tokenizer/Detokenize",
    }  # fmt: skip
    spans = wait_for_spans(collector, bytes.fromhex(trace_id), expected)
    by_name = {s.name: (svc, s) for svc, s in spans}
    assert expected <= set(by_name), f"missing spans: {expected - set(by_name)}"
    assert {svc for svc, _ in spans} >= {"gateway", "tokenizer", "prefill", "decode"}

    # One tree: only the gateway's server span hangs off the client's span; every other parent is in the trace.
    ids = {s.span_id for _, s in spans}
    roots = [s for _, s in spans if s.parent_span_id == bytes.fromhex(client_span)]
    assert [s.name for s in roots] == ["stageserve.v1.Gateway/Generate"]
    assert all(s.parent_span_id in ids for _, s in spans if s not in roots)
    assert by_name["stageserve.v1.Decode/PushKV"][1].parent_span_id == by_name["kv_transfer"][1].span_id
    assert by_name["stageserve.v1.Prefill/Prefill"][1].parent_span_id == by_name["prefill"][1].span_id

    root = next(s for _, s in spans if s.name.startswith("generate "))
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["gen_ai.usage.input_tokens"].int_value > 0
    assert attrs["gen_ai.usage.output_tokens"].int_value == PARAMS.max_tokens
    assert [v.string_value for v in attrs["gen_ai.response.finish_reasons"].array_value.values] == ["length"]
    assert attrs["gen_ai.request.model"].string_value
    assert attrs["stageserve.request_id"].string_value

    kv = {a.key for a in by_name["kv_transfer"][1].attributes}
    assert {"stageserve.kv.transport", "stageserve.kv.bytes", "stageserve.kv.blocks", "stageserve.kv.layers"} <= kv
    compute = {a.key for a in by_name["prefill.compute"][1].attributes}
    assert {"stageserve.prefill.num_cached_tokens", "stageserve.prefill.num_computed_tokens"} <= compute
    events = [e.name for e in by_name["stageserve.v1.Decode/Attach"][1].events]
    assert "first_token" in events and "finish" in events


def test_verbose_level_traces_each_decode_step_its_remote_sample_and_draft_calls(cluster, receiver):
    collector, _ = receiver
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    prompt = "Repeat after me: red green blue red green blue red green blue"  # the ngram draft has matches
    asyncio.run(generate(cluster.address("gateway-0"), prompt, f"00-{trace_id}-{client_span}-01"))
    attach = wait_for_spans(collector, bytes.fromhex(trace_id), {"stageserve.v1.Decode/Attach"})
    attach_id = next(s.span_id for _, s in attach if s.name == "stageserve.v1.Decode/Attach")

    # Each step is a root span of its own trace, linked to the request's Attach span. Every service exports
    # its spans on its own schedule, so wait until the whole tree has arrived, not only the decode steps.
    deadline = time.monotonic() + 15
    while True:
        spans = [s for _, s in collector.snapshot()]
        steps, calls, served, proposals, drafted = verbose_tree(spans, attach_id)
        sampled = len(steps) >= PARAMS.max_tokens - 1 and len(calls) == len(served) == len(steps)
        if sampled and proposals and len(drafted) == len(proposals):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(steps) >= PARAMS.max_tokens - 1  # the first token comes from prefill
    assert all(not s.parent_span_id and s.trace_id != bytes.fromhex(trace_id) for s in steps)

    # Under each step: the remote sample call, and under it the Sample service's server span.
    assert len(calls) == len(steps) and len(served) == len(steps)
    assert all({a.key for a in c.attributes} >= {"stageserve.sample.rows"} for c in calls.values())

    # Draft proposals hang off the steps too, with the Draft service's span under each (one ProposeBatch
    # per replica, and there is one replica); every step says how many draft tokens it verified and accepted.
    assert proposals, "the first decode step asks the draft for proposals"
    assert len(drafted) == len(proposals)
    for step in steps:
        keys = {a.key for a in step.attributes}
        assert {"stageserve.speculative.proposed_tokens", "stageserve.speculative.accepted_tokens"} <= keys


def verbose_tree(spans: list, attach_id: bytes) -> tuple[list, dict, list, dict, list]:
    """The decode steps linked to `attach_id`; the remote sample calls under them and the Sample service's
    server spans under those; the draft proposals under the steps and the Draft service's spans under those."""
    steps = [s for s in spans if s.name == "engine.step" and any(link.span_id == attach_id for link in s.links)]
    step_ids = {s.span_id for s in steps}
    calls = {s.span_id: s for s in spans if s.name == "sample.remote" and s.parent_span_id in step_ids}
    served = [s for s in spans if s.name == "stageserve.v1.Sample/Sample" and s.parent_span_id in calls]
    proposals = {s.span_id: s for s in spans if s.name == "draft.propose" and s.parent_span_id in step_ids}
    drafted = [s for s in spans if s.name == "stageserve.v1.Draft/ProposeBatch" and s.parent_span_id in proposals]
    return steps, calls, served, proposals, drafted


def scrape(cluster: Cluster, name: str) -> dict[str, dict[str, float]]:
    """{metric family name: {sample name + labels: value}} from `name`'s /metrics."""
    with urllib.request.urlopen(f"http://{cluster.metrics_address(name)}/metrics", timeout=5) as response:
        text = response.read().decode()
    families = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        families[family.name] = {f"{s.name}{sorted(s.labels.items())}": s.value for s in family.samples}
    return families


def count(families: dict, family: str) -> float:
    return sum(v for k, v in families[family].items() if k.startswith(f"{family}_count"))


def test_every_service_serves_metrics_that_show_the_load(cluster):
    async def load():
        await asyncio.gather(*(generate(cluster.address("gateway-0"), f"Count to {i}:") for i in range(3)))

    asyncio.run(load())
    gateway = scrape(cluster, "gateway-0")
    assert count(gateway, "stageserve:time_to_first_token_seconds") >= 3
    assert count(gateway, "stageserve:inter_token_latency_seconds") >= 3 * (PARAMS.max_tokens - 1)
    assert count(gateway, "stageserve:e2e_request_latency_seconds") >= 3
    assert gateway["stageserve:request_success"]["stageserve:request_success_total[('finish_reason', 'length')]"] >= 3

    prefill, decode = scrape(cluster, "prefill-0"), scrape(cluster, "decode-0")
    assert count(prefill, "stageserve:prefill_time_seconds") >= 3
    assert count(prefill, "stageserve:kv_transfer_bytes") >= 3
    assert sum(prefill["stageserve:prefix_cache_queries"].values()) > 0
    assert count(decode, "stageserve:decode_time_seconds") >= 3
    for families in (prefill, decode):
        assert {"stageserve:num_requests_running", "stageserve:kv_cache_usage_perc"} <= set(families)
    for name in ("tokenizer-0", "draft-0", "sample-0"):
        assert scrape(cluster, name)  # parses
