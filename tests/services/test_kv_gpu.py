"""cuda-ipc between two real processes on one GPU (skipped without CUDA): greedy parity with the
in-process engine, and both pools clean afterwards. benchmarks/kv_transfer.py runs the full version."""

from __future__ import annotations

import asyncio
import io
import random

import grpc
import pytest

from stageserve.cluster.supervisor import Cluster, ServiceSpec
from stageserve.common.convert import sampling_params_to_pb
from stageserve.engine.config import EngineConfig
from stageserve.engine.factory import create_engine
from stageserve.sample.params import SamplingParams
from stageserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

MODEL = "dummy:smollm2-135m"
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


async def generate(prefill, decode, decode_address: str, rid: str, prompt: list[int]) -> list[int]:
    params = sampling_params_to_pb(GREEDY)
    reserve = decode_pb2.ReserveRequest(request_id=rid, num_tokens=len(prompt), sampling_params=params)
    descriptor = (await decode.Reserve(reserve)).descriptor
    assert descriptor.transport == "cuda-ipc" and len(descriptor.cuda_ipc.ipc_handle) == 64
    first = await prefill.Prefill(prefill_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, sampling_params=params,
        decode_target=prefill_pb2.DecodeTarget(address=decode_address, kv=descriptor)))
    tokens = [first.first_token.token_id]
    attach = decode_pb2.AttachRequest(request_id=rid, reservation_id=descriptor.reservation_id,
                                      first_token=first.first_token, prompt_token_ids=prompt, sampling_params=params)
    async for event in decode.Attach(attach):
        tokens += [t.token_id for t in event.tokens]
    return tokens


@pytest.mark.gpu
@pytest.mark.parametrize("push", ["--kv-layer-push", "--no-kv-layer-push"])
def test_cuda_ipc_between_processes_matches_the_colocated_engine(push):
    rng = random.Random(0)
    prompts = [[rng.randrange(49152) for _ in range(n)] for n in (5, 77, 300)]
    reference = create_engine(MODEL, EngineConfig(num_blocks=256, max_graph_batch_size=8))
    expected = [r.output_token_ids for r in (reference.generate([p], GREEDY)[0] for p in prompts)]
    engine = ("--model", MODEL, "--engine-num-blocks", "256", "--engine-max-graph-batch-size", "8", "--kv-transport", "cuda-ipc")
    cluster = Cluster([ServiceSpec("prefill-0", "prefill", args=(*engine, push)), ServiceSpec("decode-0", "decode", args=engine)],
                      output=io.StringIO())

    async def main():
        p_address, d_address = cluster.address("prefill-0"), cluster.address("decode-0")
        async with grpc.aio.insecure_channel(p_address) as pc, grpc.aio.insecure_channel(d_address) as dc:
            prefill, decode = prefill_pb2_grpc.PrefillStub(pc), decode_pb2_grpc.DecodeStub(dc)
            got = [await generate(prefill, decode, d_address, f"g{i}", p) for i, p in enumerate(prompts)]
            p = (await prefill.Stats(prefill_pb2.PrefillStatsRequest())).pool
            d = (await decode.Stats(decode_pb2.DecodeStatsRequest())).pool
            return got, p, d

    try:
        cluster.start()
        cluster.wait_ready()
        got, p, d = asyncio.run(main())
    finally:
        cluster.stop()
    assert got == expected
    assert (p.free_blocks, p.active_leases) == (256, 0)
    assert (d.free_blocks, d.active_reservations, d.transfer_blocks) == (256, 0, 0)
