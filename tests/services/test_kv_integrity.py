"""Fail-closed KV integrity through real servers: tokenizer, prefill, decode and the gateway on port 0.

A chunk is corrupted in flight with its CRC-32 recomputed, so only the device page checksum can tell.
Decode must reject it (DATA_LOSS), never decode on it; the gateway prefills again and the output is
the in-process engine's. Afterwards every pool is clean: no reservation, lease or block left behind.
"""

from __future__ import annotations

import asyncio
import zlib

import grpc
import pytest

from stageserve.common.server import ServerConfig
from stageserve.decode.service import DecodeServiceConfig
from stageserve.decode.service import start as start_decode
from stageserve.engine.worker import EngineWorker
from stageserve.gateway.client import GatewayClient
from stageserve.gateway.config import GatewayServiceConfig
from stageserve.gateway.service import start as start_gateway
from stageserve.prefill.service import PrefillServiceConfig
from stageserve.prefill.service import start as start_prefill
from stageserve.sample.params import SamplingParams
from stageserve.tokenizer.service import TokenizerServiceConfig
from stageserve.tokenizer.service import start as start_tokenizer
from stageserve.transport.host import HostKVSender
from stageserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def engines(make_engine):
    return make_engine(num_blocks=NUM_BLOCKS), make_engine(num_blocks=NUM_BLOCKS), make_engine(num_blocks=NUM_BLOCKS)


def corrupt_transfers(monkeypatch, count: int) -> list[int]:
    """Flip one byte of the third chunk of the next `count` transfers, keeping their CRC-32 valid."""
    original = HostKVSender._chunks
    corrupted: list[int] = []

    async def chunks(self, descriptor, src, source, stats):
        bad = len(corrupted) < count
        index = 0
        async for chunk in original(self, descriptor, src, source, stats):
            if bad and index == 2:
                data = bytearray(chunk.data)
                data[5] ^= 0x10
                chunk.data, chunk.crc32 = bytes(data), zlib.crc32(bytes(data))
                corrupted.append(index)
            index += 1
            yield chunk

    monkeypatch.setattr(HostKVSender, "_chunks", chunks)
    return corrupted


async def run_cluster(prefill_engine, decode_engine, tokenizer, prompt, kv_retries: int):
    server = ServerConfig(host="127.0.0.1", port=0)
    workers = [EngineWorker(prefill_engine), EngineWorker(decode_engine)]
    for worker in workers:
        worker.start()
    handles = [await start_tokenizer(TokenizerServiceConfig(server=server), tokenizer)]
    try:
        decode, _ = await start_decode(DecodeServiceConfig(server=server), workers[1])
        prefill, _ = await start_prefill(PrefillServiceConfig(server=server, kv_device_checksum=True), workers[0])
        handles += [decode, prefill]
        gateway = await start_gateway(GatewayServiceConfig(
            tokenizer_addresses=(handles[0].address,), prefill_addresses=(prefill.address,),
            decode_addresses=(decode.address,), stats_poll_interval_s=0.05, rpc_timeout_s=10.0, kv_retries=kv_retries,
        ))
        handles.append(gateway)
        async with GatewayClient(gateway.address) as client:
            try:
                reply = await client.complete(prompt_token_ids=prompt, params=GREEDY, timeout_s=60)
                result = list(reply.token_ids)
            except grpc.aio.AioRpcError as exc:
                result = exc
        async with grpc.aio.insecure_channel(prefill.address) as pc, grpc.aio.insecure_channel(decode.address) as dc:
            for _ in range(100):  # a failed request's Cancel calls land within a step or two
                p = (await prefill_pb2_grpc.PrefillStub(pc).Stats(prefill_pb2.PrefillStatsRequest())).pool
                d = (await decode_pb2_grpc.DecodeStub(dc).Stats(decode_pb2.DecodeStatsRequest())).pool
                if p.free_blocks == d.free_blocks == NUM_BLOCKS:
                    break
                await asyncio.sleep(0.05)
        return result, p, d
    finally:
        for handle in reversed(handles):
            await handle.stop(0)
        for worker in workers:
            await worker.stop()


@pytest.mark.slow
def test_corrupt_pages_are_rejected_and_the_request_is_prefilled_again(engines, tokenizer, monkeypatch):
    prefill_engine, decode_engine, reference = engines
    prompt = tokenizer.encode("The history of the printing press begins in")
    expected = reference.generate([prompt], GREEDY)[0].output_token_ids
    corrupted = corrupt_transfers(monkeypatch, count=1)
    tokens, p, d = asyncio.run(run_cluster(prefill_engine, decode_engine, tokenizer, prompt, kv_retries=1))
    assert corrupted == [2]
    assert tokens == expected
    assert (p.free_blocks, p.active_leases, p.transfer_blocks) == (NUM_BLOCKS, 0, 0)
    assert (d.free_blocks, d.active_reservations, d.transfer_blocks, d.reserved_blocks) == (NUM_BLOCKS, 0, 0, 0)


@pytest.mark.slow
def test_corrupt_pages_with_no_retries_left_fail_the_request_as_data_loss(engines, tokenizer, monkeypatch):
    prefill_engine, decode_engine, _ = engines
    prompt = tokenizer.encode("Seven bridges of")
    corrupt_transfers(monkeypatch, count=1)
    error, p, d = asyncio.run(run_cluster(prefill_engine, decode_engine, tokenizer, prompt, kv_retries=0))
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.DATA_LOSS and "page_checksum" in error.details()
    assert (p.free_blocks, p.active_leases) == (NUM_BLOCKS, 0)
    assert (d.free_blocks, d.active_reservations) == (NUM_BLOCKS, 0)
