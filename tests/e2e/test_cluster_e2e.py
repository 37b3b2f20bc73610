"""End to end: every service in its own process on ephemeral ports, driven through the gateway.

Compared token for token with the in-process engine on the same model and engine settings.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time

import grpc
import pytest

from stageserve.cluster.plan import ClusterConfig, plan_services
from stageserve.cluster.supervisor import Cluster
from stageserve.gateway.client import GatewayClient
from stageserve.sample.params import SamplingParams
from stageserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)

pytestmark = pytest.mark.slow

NUM_BLOCKS = 192
ENGINE = {"engine": {"num_blocks": NUM_BLOCKS, "max_num_batched_tokens": 256}}
PROMPTS = [
    "The history of the Roman Empire",
    "def quicksort(arr):",
    "Q: What is the boiling point of water?\nA:",
    "Once upon a time, a small robot",
    "Les fleurs du printemps sont",
    "The mitochondria is",
    "import numpy as np\n",
    "Dear Sir or Madam,",
]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)


def start_cluster(sampler: str) -> Cluster:
    config = ClusterConfig(gateway_port=0, sampler=sampler, startup_timeout_s=240)
    specs = plan_services(config, {"prefill": ENGINE, "decode": ENGINE})
    cluster = Cluster(specs, output=io.StringIO(), startup_timeout_s=240, grace_s=5)
    cluster.start()
    cluster.wait_ready()
    return cluster


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster("local")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference(make_engine, tokenizer):
    engine = make_engine(**ENGINE["engine"])
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    return {
        "prompts": prompts,
        "greedy": [r.output_token_ids for r in engine.generate(prompts, GREEDY)],
        "seeded": [r.output_token_ids for r in engine.generate(prompts, SEEDED)],
    }


async def generate(address: str, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    async with GatewayClient(address) as client:
        tokens: list[int] = []
        async for message in client.generate(prompt_token_ids=prompt_ids, params=params):
            tokens += list(message.token_ids)
        return tokens


async def free_blocks(cluster: Cluster) -> tuple[int, int]:
    async with grpc.aio.insecure_channel(cluster.address("prefill-0")) as p, grpc.aio.insecure_channel(
        cluster.address("decode-0")
    ) as d:
        ps = await prefill_pb2_grpc.PrefillStub(p).Stats(prefill_pb2.PrefillStatsRequest())
        ds = await decode_pb2_grpc.DecodeStub(d).Stats(decode_pb2.DecodeStatsRequest())
        return ps.pool.free_blocks, ds.pool.free_blocks


def test_streamed_greedy_tokens_equal_in_process_engine(cluster, reference):
    async def main():
        return [await generate(cluster.address("gateway-0"), p, GREEDY) for p in reference["prompts"]]

    assert asyncio.run(main()) == reference["greedy"]
    assert len(reference["prompts"]) >= 5


def test_32_concurrent_streams_complete_correctly(cluster, reference):
    jobs = [(i % len(PROMPTS)) for i in range(32)]

    async def main():
        return await asyncio.gather(*(generate(cluster.address("gateway-0"), reference["prompts"][j], GREEDY) for j in jobs))

    results = asyncio.run(main())
    assert [r == reference["greedy"][j] for r, j in zip(results, jobs)] == [True] * 32


def test_cancel_mid_stream_returns_both_pools_to_start(cluster, tokenizer):
    prompt = tokenizer.encode("Write a very long essay about the ocean and everything that lives in it.")

    async def main():
        start = await free_blocks(cluster)
        async with GatewayClient(cluster.address("gateway-0")) as client:
            stream = client.generate(prompt_token_ids=prompt, params=SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
            received = 0
            async for message in stream:
                received += len(message.token_ids)
                if received >= 3:
                    break
            await stream.aclose()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and await free_blocks(cluster) != start:
            await asyncio.sleep(0.05)
        return start, await free_blocks(cluster)

    start, end = asyncio.run(main())
    assert start == (NUM_BLOCKS, NUM_BLOCKS)
    assert end == start


BAD_INPUTS = {
    "empty prompt": (dict(prompt=""), "prompt"),
    "prompt too long": (dict(prompt_token_ids=gateway_pb2.TokenIds(ids=[1] * 9000)), "prompt"),
    "max_tokens < 1": (dict(prompt="hi", sampling_params=common_pb2.SamplingParams(max_tokens=0)), "max_tokens"),
    "max_tokens too large": (dict(prompt="hi", sampling_params=common_pb2.SamplingParams(max_tokens=100_000)), "max_tokens"),
    "temperature < 0": (dict(prompt="hi", sampling_params=common_pb2.SamplingParams(temperature=-1)), "temperature"),
    "top_p > 1": (dict(prompt="hi", sampling_params=common_pb2.SamplingParams(top_p=1.5)), "top_p"),
    "unknown model": (dict(prompt="hi", model="no-such-model"), "model"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_rejected_naming_the_field_and_cluster_keeps_serving(cluster, reference, case):
    fields, name = BAD_INPUTS[case]

    async def main():
        async with grpc.aio.insecure_channel(cluster.address("gateway-0")) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(gateway_pb2.GenerateRequest(**fields), timeout=30):
                    pass
            return err.value

    err = asyncio.run(main())
    expected = grpc.StatusCode.NOT_FOUND if case == "unknown model" else grpc.StatusCode.INVALID_ARGUMENT
    assert err.code() == expected, err.details()
    assert name in err.details()
    assert asyncio.run(generate(cluster.address("gateway-0"), reference["prompts"][0], GREEDY)) == reference["greedy"][0]


def test_message_over_the_size_cap_is_refused(cluster):
    async def main():
        async with grpc.aio.insecure_channel(
            cluster.address("gateway-0"), options=[("grpc.max_send_message_length", 256 << 20)]
        ) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(gateway_pb2.GenerateRequest(prompt="x" * (80 << 20)), timeout=30):
                    pass
            return err.value.code()

    assert asyncio.run(main()) in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)


def test_remote_sampler_gives_the_same_seeded_outputs(cluster, reference):
    remote = start_cluster("remote")
    try:
        async def main(address):
            return [await generate(address, p, SEEDED) for p in reference["prompts"][:5]]

        remote_out = asyncio.run(main(remote.address("gateway-0")))
        local_out = asyncio.run(main(cluster.address("gateway-0")))
    finally:
        remote.stop()
    assert remote_out == local_out == reference["seeded"][:5]


def test_all_decode_workers_down_gives_unavailable_quickly(reference):
    c = start_cluster("local")
    try:
        os.kill(c.pid("decode-0"), signal.SIGKILL)
        time.sleep(0.2)

        async def main():
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generate(c.address("gateway-0"), reference["prompts"][0], GREEDY)
            return err.value.code(), time.monotonic() - start

        code, elapsed = asyncio.run(main())
    finally:
        c.stop()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 3.0
