"""Faults under load where process death matters: every service in its own process (`Cluster`).

One cluster (tokenizer, draft, 2 prefill, 2 decode, gateway) serves the whole module; each test takes
away one process, in this order: SIGKILL decode-1, SIGKILL prefill-1, SIGTERM the gateway (drain),
SIGTERM decode-0 (drain). prefill-0 and decode-0 stay up until the last test, so each test also runs
on its own (`-k`). Every call carries a deadline, so a hang fails the test instead of stalling it.

RELIABILITY.md lists each guarantee next to the test here that proves it.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from dataclasses import dataclass, field

import grpc
import grpc.aio
import pytest
from test_cluster_e2e import PROMPTS  # the same eight prompts as the cluster e2e test

from stageserve.cluster.plan import ClusterConfig, plan_services
from stageserve.cluster.supervisor import Cluster
from stageserve.common.convert import sampling_params_to_pb
from stageserve.gateway.client import build_request
from stageserve.sample.params import SamplingParams
from stageserve.v1 import decode_pb2, decode_pb2_grpc, gateway_pb2_grpc, prefill_pb2, prefill_pb2_grpc

pytestmark = pytest.mark.slow

NUM_BLOCKS = 128
ENGINE = {"engine": {"num_blocks": NUM_BLOCKS, "max_num_batched_tokens": 256}}
# Drain grace of the gateway and decode: long enough for the drain tests' streams on a busy 2-core machine
# (the drain must finish them, not race a short grace).
GRACE = {"server": {"grace_s": 30}}
DEADLINE_S = 40.0  # of every client call: a hang shows up as DEADLINE_EXCEEDED at this bound
TYPED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
}


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    config = ClusterConfig(gateway_port=0, prefill_replicas=2, decode_replicas=2, startup_timeout_s=240)
    specs = plan_services(config, {"prefill": ENGINE, "decode": {**ENGINE, **GRACE}, "gateway": GRACE})
    with Cluster(specs, output=io.StringIO(), startup_timeout_s=240, grace_s=5) as c:
        c.start()
        c.wait_ready()
        yield c


@pytest.fixture(scope="module")
def reference(make_engine, tokenizer):
    """Greedy outputs of the in-process engine, per prompt and max_tokens."""
    engine = make_engine(**ENGINE["engine"])
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    cache: dict[int, list[list[int]]] = {}

    def outputs(max_tokens: int) -> list[list[int]]:
        if max_tokens not in cache:
            cache[max_tokens] = [list(r.output_token_ids) for r in engine.generate(prompts, greedy(max_tokens))]
        return cache[max_tokens]

    return prompts, outputs


@dataclass
class Outcome:
    """What one client saw: its tokens, and how (and when) the call ended."""

    tokens: list[int] = field(default_factory=list)
    messages: int = 0
    code: grpc.StatusCode | None = None  # None: completed
    details: str = ""
    seconds: float = 0.0
    ended_at: float = 0.0  # time.monotonic() when the call ended
    first: asyncio.Event = field(default_factory=asyncio.Event)  # set at the first message


async def stream(stub, prompt_ids: list[int], params: SamplingParams, outcome: Outcome) -> Outcome:
    start = time.monotonic()
    try:
        call = stub.Generate(build_request(prompt_token_ids=prompt_ids, params=params), timeout=DEADLINE_S)
        async for message in call:
            outcome.tokens += list(message.token_ids)
            outcome.messages += 1
            outcome.first.set()
    except grpc.aio.AioRpcError as exc:
        outcome.code, outcome.details = exc.code(), exc.details()
    outcome.ended_at = time.monotonic()
    outcome.seconds = outcome.ended_at - start
    outcome.first.set()
    return outcome


async def pool_stats(cluster: Cluster, name: str):
    async with grpc.aio.insecure_channel(cluster.address(name)) as channel:
        if name.startswith("decode"):
            return (await decode_pb2_grpc.DecodeStub(channel).Stats(decode_pb2.DecodeStatsRequest(), timeout=5)).pool
        return (await prefill_pb2_grpc.PrefillStub(channel).Stats(prefill_pb2.PrefillStatsRequest(), timeout=5)).pool


async def wait_idle(cluster: Cluster, names: list[str], timeout_s: float = 15.0) -> dict:
    """Each named worker's pool, once every one is idle (every block free, nothing reserved, running or waiting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pools = {n: await pool_stats(cluster, n) for n in names}
        summary = {
            n: (p.free_blocks, p.total_blocks, p.reserved_blocks, p.num_running, p.num_waiting) for n, p in pools.items()
        }
        if all(f == t and r == w == n == 0 for f, t, r, w, n in summary.values()) or time.monotonic() > deadline:
            return summary


def wait_exit(cluster: Cluster, name: str, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for exited, code in cluster.exited():
            if exited == name:
                return code
        time.sleep(0.05)
    return None


async def load(
    cluster: Cluster, prompts: list[list[int]], n: int, max_tokens: int, kill, after_messages: int = 2, after_s: float = 0.0
):
    """`n` streams through the gateway; once each has `after_messages` messages (or one stream is half
    done, so that none has finished yet, or 10 s passed) and `after_s` passed, `kill()`."""
    async with grpc.aio.insecure_channel(cluster.address("gateway-0")) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        outcomes = [Outcome() for _ in range(n)]
        tasks = [
            asyncio.ensure_future(stream(stub, prompts[i % len(prompts)], greedy(max_tokens), outcomes[i]))
            for i in range(n)
        ]
        deadline = time.monotonic() + 10
        def waiting() -> bool:
            if any(len(o.tokens) * 2 >= max_tokens for o in outcomes):
                return False
            return any(o.messages < after_messages and o.code is None for o in outcomes)

        while time.monotonic() < deadline and waiting():
            await asyncio.sleep(0.02)
        await asyncio.sleep(after_s)
        killed_at = time.monotonic()
        kill()
        await asyncio.gather(*tasks)
        return outcomes, killed_at


async def generate_all(cluster: Cluster, prompts: list[list[int]], max_tokens: int) -> list[Outcome]:
    async with grpc.aio.insecure_channel(cluster.address("gateway-0")) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return list(await asyncio.gather(*(stream(stub, p, greedy(max_tokens), Outcome()) for p in prompts)))


def summarize(outcomes: list[Outcome]) -> dict:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = "completed" if o.code is None else o.code.name
        counts[key] = counts.get(key, 0) + 1
    return counts


# ---- crashes ----------------------------------------------------------------------------------------


def test_sigkill_of_a_decode_replica_under_load(cluster, reference):
    """32 streams over 2 decode replicas; decode-1 is SIGKILLed mid-stream. Each stream on decode-1 fails
    with UNAVAILABLE within 2 s of the kill (tokens already streamed can't be taken back; worker_retry
    always would move them instead), every other one completes correctly, and new requests then
    succeed on decode-0."""
    prompts, outputs = reference
    max_tokens = 32
    expected = outputs(max_tokens)

    async def main():
        outcomes, killed_at = await load(
            cluster, prompts, 32, max_tokens, lambda: os.kill(cluster.pid("decode-1"), signal.SIGKILL)
        )
        after = await generate_all(cluster, prompts, 16)
        idle = await wait_idle(cluster, ["decode-0", "prefill-0", "prefill-1"])
        return outcomes, killed_at, after, idle

    outcomes, killed_at, after, idle = asyncio.run(main())
    failed_within = max((o.ended_at - killed_at for o in outcomes if o.code), default=0.0)
    drained_s = max(o.ended_at for o in outcomes) - killed_at
    print(f"decode SIGKILL: {summarize(outcomes)}; failures within {failed_within:.2f} s of the kill; "
          f"every stream ended {drained_s:.1f} s after it")
    for i, o in enumerate(outcomes):
        if o.code is None:
            assert o.tokens == expected[i % len(prompts)]
        else:
            assert o.code is grpc.StatusCode.UNAVAILABLE, (o.code, o.details)
            assert o.tokens == expected[i % len(prompts)][: len(o.tokens)]  # what arrived was right
    assert any(o.code is not None for o in outcomes), "the killed replica served none of the streams"
    assert failed_within < 2.0
    assert drained_s < DEADLINE_S  # nothing hung
    assert [o.code for o in after] == [None] * len(prompts)
    assert [o.tokens for o in after] == outputs(16)
    assert all(f == t and r == w == n == 0 for f, t, r, w, n in idle.values()), idle


def test_sigkill_of_a_prefill_replica_under_load(cluster, reference):
    """16 requests over 2 prefill replicas; prefill-1 is SIGKILLed while prompts are in flight. A Prefill
    call it was running moves to prefill-0 (transparent retry); a request whose KV it had not finished
    sending ends UNAVAILABLE within 2 s (decode fails a cut-off push at once; a push not yet begun is
    cut by the gateway once its probe finds prefill-1 gone). Every other request completes with the
    right number of tokens, nothing hangs, and new requests then succeed."""
    prompts, outputs = reference
    # Long prompts keep prefill busy long enough to be killed mid-work.
    long_prompts = [p * 12 for p in prompts]
    max_tokens = 8

    async def main():
        outcomes, killed_at = await load(
            cluster, long_prompts, 16, max_tokens, lambda: os.kill(cluster.pid("prefill-1"), signal.SIGKILL),
            after_messages=0, after_s=0.4,
        )
        after = await generate_all(cluster, prompts, 16)
        idle = await wait_idle(cluster, ["decode-0", "prefill-0"])
        return outcomes, killed_at, after, idle

    outcomes, killed_at, after, idle = asyncio.run(main())
    failed_within = max((o.ended_at - killed_at for o in outcomes if o.code), default=0.0)
    drained_s = max(o.ended_at for o in outcomes) - killed_at
    print(f"prefill SIGKILL: {summarize(outcomes)}; failures within {failed_within:.2f} s of the kill; every "
          f"request ended {drained_s:.1f} s after it; codes {[(o.code.name, o.details[:80]) for o in outcomes if o.code]}")
    assert any(o.ended_at > killed_at for o in outcomes), "the kill came after the load"
    for o in outcomes:
        if o.code is None:
            assert len(o.tokens) == max_tokens
        else:
            assert o.code is grpc.StatusCode.UNAVAILABLE, (o.code, o.details)
    assert failed_within < 2.0
    assert drained_s < DEADLINE_S
    assert [o.code for o in after] == [None] * len(prompts)
    assert [o.tokens for o in after] == outputs(16)
    assert all(f == t and r == w == n == 0 for f, t, r, w, n in idle.values()), idle


# ---- drain --------------------------------------------------------------------------------------------


def test_sigterm_of_the_gateway_lets_admitted_streams_finish(cluster, reference):
    """SIGTERM to the gateway with 16 streams in flight: each admitted stream completes (within the server grace),
    a new request is refused with UNAVAILABLE, and the gateway exits 0."""
    prompts, outputs = reference
    max_tokens = 16
    expected = outputs(max_tokens)
    pid = cluster.pid("gateway-0")

    async def main():
        outcomes, killed_at = await load(cluster, prompts, 16, max_tokens, lambda: os.kill(pid, signal.SIGTERM), 1)
        late = await generate_all(cluster, prompts[:1], 4)
        return outcomes, max(o.ended_at for o in outcomes) - killed_at, late

    outcomes, drained_s, late = asyncio.run(main())
    code = wait_exit(cluster, "gateway-0", 35)
    print(f"gateway SIGTERM: {summarize(outcomes)} in {drained_s:.1f} s; late request: "
          f"{late[0].code.name if late[0].code else 'completed'}; exit code {code}")
    assert [(o.code, o.details) for o in outcomes] == [(None, "")] * len(outcomes)
    assert [o.tokens for o in outcomes] == [expected[i % len(prompts)] for i in range(len(outcomes))]
    assert late[0].code is grpc.StatusCode.UNAVAILABLE
    assert code == 0


async def direct_generate(cluster: Cluster, request_id: str, prompt: list[int], params: SamplingParams, outcome: Outcome):
    """Reserve on decode-0, Prefill on prefill-0 (pushes the KV), Attach: the gateway's flow without a gateway."""
    pb = sampling_params_to_pb(params)
    start = time.monotonic()
    async with grpc.aio.insecure_channel(cluster.address("decode-0")) as d, grpc.aio.insecure_channel(
        cluster.address("prefill-0")
    ) as p:
        decode, prefill = decode_pb2_grpc.DecodeStub(d), prefill_pb2_grpc.PrefillStub(p)
        try:
            reserved = await decode.Reserve(
                decode_pb2.ReserveRequest(request_id=request_id, num_tokens=len(prompt), sampling_params=pb),
                timeout=DEADLINE_S,
            )
            target = prefill_pb2.DecodeTarget(address=cluster.address("decode-0"), kv=reserved.descriptor)
            first = await prefill.Prefill(
                prefill_pb2.PrefillRequest(
                    request_id=request_id, prompt_token_ids=prompt, sampling_params=pb, decode_target=target
                ),
                timeout=DEADLINE_S,
            )
            outcome.tokens.append(first.first_token.token_id)
            outcome.messages += 1
            attach = decode.Attach(
                decode_pb2.AttachRequest(
                    request_id=request_id, reservation_id=reserved.descriptor.reservation_id,
                    first_token=first.first_token, prompt_token_ids=prompt, sampling_params=pb,
                ),
                timeout=DEADLINE_S,
            )
            async for event in attach:
                outcome.tokens += [t.token_id for t in event.tokens]
                outcome.messages += 1
        except grpc.aio.AioRpcError as exc:
            outcome.code, outcome.details = exc.code(), exc.details()
    outcome.seconds = time.monotonic() - start
    return outcome


def test_sigterm_of_a_decode_worker_lets_attached_streams_finish(cluster, reference):
    """SIGTERM to decode-0 with 8 sequences decoding: each attached stream completes within the server's
    grace, a Reserve after the signal is refused with UNAVAILABLE, and the process exits 0.

    Driven without the gateway (test_sigterm_of_the_gateway... stopped it), as the gateway would drive it."""
    prompts, outputs = reference
    max_tokens = 24
    expected = outputs(max_tokens)
    pid = cluster.pid("decode-0")

    async def main():
        outcomes = [Outcome() for _ in range(8)]
        tasks = [
            asyncio.ensure_future(direct_generate(cluster, f"drain-{i}", prompts[i], greedy(max_tokens), outcomes[i]))
            for i in range(8)
        ]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(o.messages < 3 and o.code is None for o in outcomes):
            await asyncio.sleep(0.02)
        os.kill(pid, signal.SIGTERM)
        await asyncio.sleep(0.2)
        late = await direct_generate(cluster, "late", prompts[0], greedy(4), Outcome())
        await asyncio.gather(*tasks)
        return outcomes, late

    outcomes, late = asyncio.run(main())
    code = wait_exit(cluster, "decode-0", 35)
    print(f"decode SIGTERM: {summarize(outcomes)}; late Reserve: {late.code.name if late.code else 'completed'}; "
          f"exit code {code}")
    assert [(o.code, o.details) for o in outcomes] == [(None, "")] * 8
    assert [o.tokens for o in outcomes] == expected
    assert late.code is grpc.StatusCode.UNAVAILABLE
    assert code == 0
