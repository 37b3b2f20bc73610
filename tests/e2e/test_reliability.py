"""Reliability under load and faults, against real services.

In-process (one event loop, real grpc.aio servers on port 0, engines on the shared weights):
- a cancellation storm through the gateway leaves no block, sequence or reservation behind;
- 4x more concurrent requests than the decode KV pool holds all complete, token for token equal
  to the in-process engine run alone;
- the decode engine never stalls with its pool held by waiting sequences.

Faults where process death matters (SIGKILL, SIGTERM drain) are in test_reliability_cluster.py.

RELIABILITY.md lists each guarantee next to the test here that proves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
from test_cluster_e2e import PROMPTS  # the same eight prompts as the cluster e2e test
from test_reliability_cluster import TYPED as CLUSTER_TYPED

from stageserve.common.server import ServerConfig, ServerHandle
from stageserve.decode.service import DecodeServiceConfig
from stageserve.decode.service import start as start_decode
from stageserve.engine.config import EngineConfig
from stageserve.engine.factory import create_engine
from stageserve.engine.worker import EngineWorker
from stageserve.gateway.client import build_request
from stageserve.gateway.config import GatewayServiceConfig
from stageserve.gateway.service import GatewayHandle
from stageserve.gateway.service import start as start_gateway
from stageserve.prefill.service import PrefillServiceConfig
from stageserve.prefill.service import start as start_prefill
from stageserve.sample.params import SamplingParams
from stageserve.sample.sampler import SampledToken
from stageserve.tokenizer.service import TokenizerServiceConfig
from stageserve.tokenizer.service import start as start_tokenizer
from stageserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2_grpc, prefill_pb2, prefill_pb2_grpc

pytestmark = pytest.mark.slow

TYPED = CLUSTER_TYPED | {grpc.StatusCode.CANCELLED}  # statuses a client can act on


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


# ---- the in-process stack -------------------------------------------------------------------------


@dataclass
class Stack:
    gateway: GatewayHandle
    stub: gateway_pb2_grpc.GatewayStub
    prefill: prefill_pb2_grpc.PrefillStub
    decode: decode_pb2_grpc.DecodeStub

    async def pools(self) -> tuple[common_pb2.KVPoolStats, common_pb2.KVPoolStats]:
        p = await self.prefill.Stats(prefill_pb2.PrefillStatsRequest(), timeout=10)
        d = await self.decode.Stats(decode_pb2.DecodeStatsRequest(), timeout=10)
        return p.pool, d.pool

    async def settled(self, timeout_s: float = 15.0) -> tuple[common_pb2.KVPoolStats, common_pb2.KVPoolStats]:
        """Both pools once every block is free and nothing runs, waits or is reserved (or at the timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            pools = await self.pools()
            if all(idle(p) for p in pools) or time.monotonic() > deadline:
                return pools
            await asyncio.sleep(0.1)


def idle(pool: common_pb2.KVPoolStats) -> bool:
    return (pool.free_blocks, pool.reserved_blocks, pool.num_running, pool.num_waiting) == (pool.total_blocks, 0, 0, 0)


@contextlib.asynccontextmanager
async def stack(make_engine, tokenizer, prefill_engine: dict, decode_engine: dict, **gateway_options) -> AsyncIterator[Stack]:
    """Tokenizer, prefill, decode and gateway servers on port 0, each engine on its own thread."""
    server = ServerConfig(host="127.0.0.1", port=0)
    workers = [EngineWorker(make_engine(**prefill_engine)), EngineWorker(make_engine(**decode_engine))]
    for worker in workers:
        worker.start()
    handles: list[ServerHandle] = []
    channels: list[grpc.aio.Channel] = []
    try:
        handles.append(await start_tokenizer(TokenizerServiceConfig(server=server), tokenizer))
        handles.append((await start_decode(DecodeServiceConfig(server=server), workers[1]))[0])
        handles.append((await start_prefill(PrefillServiceConfig(server=server), workers[0]))[0])
        tok, dec, pre = handles
        config = GatewayServiceConfig(
            tokenizer_addresses=(tok.address,),
            prefill_addresses=(pre.address,),
            decode_addresses=(dec.address,),
            **{"stats_poll_interval_s": 0.1, **gateway_options},
        )
        gateway = await start_gateway(config)
        handles.append(gateway)
        channels = [grpc.aio.insecure_channel(h.address) for h in (gateway, pre, dec)]
        yield Stack(
            gateway,
            gateway_pb2_grpc.GatewayStub(channels[0]),
            prefill_pb2_grpc.PrefillStub(channels[1]),
            decode_pb2_grpc.DecodeStub(channels[2]),
        )
    finally:
        for channel in channels:
            await channel.close()
        for handle in reversed(handles):
            await handle.stop(grace=0)
        for worker in workers:
            await worker.stop()


async def collect(stub: gateway_pb2_grpc.GatewayStub, prompt_ids: list[int], params: SamplingParams, timeout: float = 60):
    tokens: list[int] = []
    finish = 0
    async for message in stub.Generate(build_request(prompt_token_ids=prompt_ids, params=params), timeout=timeout):
        tokens += list(message.token_ids)
        finish = message.finish_reason or finish
    return tokens, finish


# ---- cancellation storm ---------------------------------------------------------------------------

STORM_REQUESTS = 500
STORM_CONCURRENCY = 48


async def storm_request(stub, rng: random.Random, prompt_ids: list[int]) -> str:
    """One request of the storm: runs to the end, cancels after k messages, or has a short deadline.

    Returns what happened: "completed", "cancelled" or the status code's name.
    """
    max_tokens = rng.randint(1, 8)
    mode = rng.choice(["complete", "cancel", "cancel", "deadline", "deadline"])
    timeout = rng.uniform(0.005, 0.6) if mode == "deadline" else 60.0
    cancel_after = rng.randint(0, 3) if mode == "cancel" else None
    delay = rng.uniform(0, 0.05)
    call = stub.Generate(build_request(prompt_token_ids=prompt_ids, params=greedy(max_tokens)), timeout=timeout)
    received: list[int] = []
    messages = 0
    try:
        if cancel_after == 0:  # cancel before any message: in the queue, tokenizing, reserving or prefilling
            await asyncio.sleep(delay)
            call.cancel()
            return "cancelled"
        while (message := await call.read()) is not grpc.aio.EOF:
            received += list(message.token_ids)
            messages += 1
            if cancel_after is not None and messages >= cancel_after:
                call.cancel()
                return "cancelled"
        assert len(received) == max_tokens, f"a completed request got {len(received)} of {max_tokens} tokens"
        return "completed"
    except asyncio.CancelledError:
        return "cancelled"
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.CANCELLED:
            return "cancelled"
        if mode == "complete" or exc.code() not in TYPED:
            return f"{exc.code().name} in {mode} mode: {exc.details()}"
        return exc.code().name


def test_cancellation_storm_leaves_nothing_behind(make_engine, tokenizer):
    """500 requests, each completing, cancelled after 0-3 messages, or given a 5-600 ms deadline."""
    rng = random.Random(20261121)
    prompts = [tokenizer.encode(p) for p in PROMPTS]

    async def main():
        async with stack(make_engine, tokenizer, {}, {}) as s:
            before = await s.pools()
            limit = asyncio.Semaphore(STORM_CONCURRENCY)

            async def one(i: int) -> str:
                async with limit:
                    # A few distinct tails, so prefix caching both hits and misses.
                    return await storm_request(s.stub, rng, prompts[i % len(prompts)] + [10 + i % 7])

            start = time.monotonic()
            outcomes = Counter(await asyncio.gather(*(one(i) for i in range(STORM_REQUESTS))))
            elapsed = time.monotonic() - start
            after = await s.settled()
            admission = s.gateway.gateway.admission
            gateway_left = (admission.num_running, admission.num_waiting, len(s.gateway.gateway.active))
            check = await collect(s.stub, prompts[0], greedy(6))
            return before, after, outcomes, elapsed, gateway_left, check

    before, after, outcomes, elapsed, gateway_left, check = asyncio.run(main())
    print(f"storm: {STORM_REQUESTS} requests in {elapsed:.1f} s: {dict(outcomes)}")
    assert all(idle(p) for p in before)
    unexpected = {k: v for k, v in outcomes.items() if k not in ("completed", "cancelled", "DEADLINE_EXCEEDED")}
    assert unexpected == {}
    assert outcomes["completed"] > 0 and outcomes["cancelled"] > 0 and outcomes["DEADLINE_EXCEEDED"] > 0
    prefill, decode = after
    assert (prefill.free_blocks, prefill.reserved_blocks, prefill.num_running, prefill.num_waiting) == (
        prefill.total_blocks, 0, 0, 0
    )
    assert (decode.free_blocks, decode.reserved_blocks, decode.num_running, decode.num_waiting) == (
        decode.total_blocks, 0, 0, 0
    )
    assert gateway_left == (0, 0, 0)
    assert len(check[0]) == 6 and check[1] == common_pb2.FINISH_REASON_LENGTH


# ---- oversubscription -----------------------------------------------------------------------------

OVERSUB_BLOCK_SIZE = 16
OVERSUB_DECODE_BLOCKS = 8  # 4 sequences of 2 blocks each (a prompt of ~10 tokens + 16 generated)
OVERSUB_MAX_TOKENS = 16
OVERSUB_REQUESTS = 16  # 4x what the decode pool holds at once
# One call: a hang guard, not a speed bound. An admitted call may wait out two rounds of the pool: 3-6 s alone on
# 2 cores, up to 11 s beside two busy processes (2026-12-05); 15 s was exceeded once in a loaded CI run.
OVERSUB_TIMEOUT_S = 60


def test_four_times_the_decode_pool_all_complete_equal_to_the_engine_alone(make_engine, tokenizer):
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) + [20 + i] for i in range(OVERSUB_REQUESTS)]
    per_seq = -(-(max(map(len, prompts)) + OVERSUB_MAX_TOKENS) // OVERSUB_BLOCK_SIZE)
    assert OVERSUB_REQUESTS >= 4 * (OVERSUB_DECODE_BLOCKS // per_seq)
    reference_engine = make_engine(num_blocks=256)
    expected = [[*r.output_token_ids] for r in reference_engine.generate(prompts, greedy(OVERSUB_MAX_TOKENS))]
    small = {"num_blocks": OVERSUB_DECODE_BLOCKS, "block_size": OVERSUB_BLOCK_SIZE}

    async def main():
        # Every server of this stack shares the test process's event loop, beside two busy engine threads,
        # on a 2-core CI machine: under the full suite a 5 s Stats probe was missed once (2026-12-04) and
        # took the only prefill worker out of rotation. This test is about the KV pool, not probes, so they
        # get more time here (tests/services/test_gateway_reliability.py covers a worker that stops answering).
        async with stack(make_engine, tokenizer, small, small, probe_timeout_s=30.0) as s:
            retries = Counter()

            async def one(i: int):
                # RESOURCE_EXHAUSTED means "try later" (README, errors.py): a client that honours it must get through.
                while time.monotonic() - start < 5 * OVERSUB_TIMEOUT_S:
                    try:
                        return await collect(s.stub, prompts[i], greedy(OVERSUB_MAX_TOKENS), timeout=OVERSUB_TIMEOUT_S)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                            return exc.code().name, None
                        retries[i] += 1
                        await asyncio.sleep(0.05)
                return "refused until the test gave up", None

            start = time.monotonic()
            results = await asyncio.gather(*(one(i) for i in range(OVERSUB_REQUESTS)))
            return results, retries, time.monotonic() - start, await s.settled()

    results, retries, elapsed, after = asyncio.run(main())
    print(f"oversubscription: {elapsed:.1f} s, {sum(retries.values())} RESOURCE_EXHAUSTED retries over {len(retries)} requests")
    assert [tokens for tokens, _ in results] == expected
    assert all(finish == common_pb2.FINISH_REASON_LENGTH for _, finish in results)
    assert all(idle(p) for p in after)


def test_decode_engine_with_a_full_pool_never_stops_making_progress():
    """Once a deadlock: attached requests wait holding their blocks behind a preempted one that cannot be
    allocated, with nothing running. Step by step on one engine (a tiny dummy model: only the bookkeeping
    matters): 4 blocks, sequences of 2 blocks, and a Reserve (as the gateway retries it) whenever a block
    is free between two steps."""
    engine = create_engine("dummy:tiny", EngineConfig(num_blocks=4, block_size=16, device="cpu", dtype="float32"))
    params = greedy(16)
    prompt = list(range(100, 111))  # 11 tokens: 1 block reserved; 27 with the output: 2 blocks
    added: list[str] = []

    def reserve_and_attach() -> None:
        request_id = f"r{len(added)}"
        engine.reserve(request_id, len(prompt), params)
        engine.attach(request_id, prompt, SampledToken(5, 0.0, ()))  # the KV content does not matter here
        added.append(request_id)

    for _ in range(3):
        reserve_and_attach()
    steps_without_output = 0
    for _ in range(400):
        if not engine.has_unfinished():
            break
        outputs = engine.step()
        while len(added) < 8 and engine.kv.stats().num_free_blocks >= 1:
            reserve_and_attach()
        steps_without_output = 0 if outputs else steps_without_output + 1
        assert steps_without_output < 20, {
            r.request_id: (r.status.value, engine.kv.block_ids(r.request_id)) for r in engine.requests.values()
        }
    assert not engine.has_unfinished() and len(added) == 8
