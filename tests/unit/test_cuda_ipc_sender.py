"""The cuda-ipc sender's control plane on a CPU: CudaIpcKVSender.send over real gRPC into the real
`KVLanding.receive_writes`, with decode's pool handed to the sender as if mapped, and CUDA streams and
events replaced by no-op fakes (the copies run in torch on the CPU). The GPU half is tests/services/test_kv_gpu.py.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from test_kv_lifecycle import LAYOUT, NUM_BLOCKS, FakeDecode, FakeRunner, attach, run

from stageserve.transport.base import KVDescriptor, KVSource
from stageserve.transport.cuda_ipc import IPC_HANDLE_BYTES, CudaIpcKVSender
from stageserve.transport.lifecycle import TransferState
from stageserve.transport.select import host_id
from stageserve.v1 import common_pb2, decode_pb2_grpc


class FakeEvent:
    def __init__(self, enable_timing: bool = False):
        pass

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other) -> float:
        return 0.5


class FakeStream:
    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self) -> FakeEvent:
        return FakeEvent()

    def synchronize(self) -> None:
        pass


class WriteOnlyDecode(decode_pb2_grpc.DecodeServicer):
    def __init__(self, decode: FakeDecode):
        self.decode = decode

    async def WriteKV(self, request_iterator, context):
        async for ack in self.decode.landing.receive_writes(request_iterator, self.decode.table, max_lease_s=30.0):
            yield ack


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())


def ipc_params() -> common_pb2.CudaIpcTransportParams:
    stride = LAYOUT.bytes_per_block_layer * NUM_BLOCKS
    return common_pb2.CudaIpcTransportParams(
        host_id=host_id(), device_index=0, ipc_handle=b"\1" * IPC_HANDLE_BYTES, pool_id="p", base_offset=0,
        layer_stride_bytes=stride, num_blocks=NUM_BLOCKS, allocation_bytes=stride * LAYOUT.num_layers,
    )


async def transfer(decode: FakeDecode, request_id: str, layer_push: bool, checksum: bool = True, fail=None):
    """Reserve at decode, then send from a fresh source pool over a real gRPC WriteKV stream."""
    server = grpc.aio.server()
    decode_pb2_grpc.add_DecodeServicer_to_server(WriteOnlyDecode(decode), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        reservation = decode.reserve(request_id, 3, transport="cuda-ipc")
        descriptor = KVDescriptor("cuda-ipc", reservation.reservation_id, reservation.block_ids, LAYOUT,
                                  address=f"127.0.0.1:{port}", cuda_ipc=ipc_params())
        sender = CudaIpcKVSender(lambda address: channel, torch.device("cpu"), layer_push=layer_push)
        sender.stream = FakeStream()
        sender._pool = lambda ipc, layout: decode.runner.kv_pool  # decode's pool, "mapped"
        sender._block_ids = lambda src, dst: (torch.tensor(src), torch.tensor(dst))
        if fail is not None:
            sender._notice = fail
        source = FakeRunner(seed=2).kv_pool

        async def read_layer(layer, ids):
            return source[layer].index_select(1, torch.tensor(ids))

        src = [5, 0, 9]
        stats = await sender.send(descriptor, src, KVSource(read_layer, source, device_checksum=checksum), 5.0)
        return reservation, stats, source.index_select(2, torch.tensor(src))
    finally:
        await channel.close()
        await server.stop(0)


@pytest.mark.parametrize("layer_push", [False, True], ids=["whole_request", "layer_by_layer"])
def test_one_write_stream_claims_copies_and_lands_every_layer(no_cuda, layer_push):
    async def main():
        decode = FakeDecode()
        reservation, stats, expected = await transfer(decode, "ok", layer_push)
        landed = decode.runner.kv_pool.index_select(2, torch.tensor(reservation.block_ids))
        await attach(decode.table, reservation)
        return reservation, stats, expected, landed

    reservation, stats, expected, landed = run(main())
    assert torch.equal(landed, expected)
    assert reservation.state is TransferState.ATTACHED
    assert stats.num_chunks == (LAYOUT.num_layers if layer_push else 1)
    assert stats.num_bytes == 3 * LAYOUT.num_layers * LAYOUT.bytes_per_block_layer
    assert stats.claim_seconds > 0 and stats.checksum_seconds > 0
    assert stats.device_seconds == 0.0005  # the fake events' window: every layer's copies were timed as one


def test_a_sender_failing_after_its_claim_aborts_on_the_stream_and_decode_frees_at_once(no_cuda):
    def broken_notice(*args):
        raise RuntimeError("device fault")

    async def main():
        decode = FakeDecode()
        with pytest.raises(RuntimeError, match="device fault"):
            await transfer(decode, "f", layer_push=False, fail=broken_notice)
        await asyncio.sleep(0.05)  # decode reads the abort
        reservation = decode.table._ended["res-f"]
        with pytest.raises(Exception, match="gave up: RuntimeError: device fault"):
            await attach(decode.table, reservation)
        return decode, reservation

    decode, reservation = run(main())
    assert reservation.state is TransferState.ABORTED and reservation.writer_deadline is None
    assert len(decode.free_list) == NUM_BLOCKS and decode.table.num_blocks == 0  # not after the claim's lease


def test_a_refused_claim_copies_nothing(no_cuda):
    async def main():
        decode = FakeDecode()
        before = decode.runner.kv_pool.clone()
        original = decode.reserve

        def reserve_then_cancel(request_id, num_blocks, ttl_s=30.0, transport="host"):
            reservation = original(request_id, num_blocks, ttl_s, transport)
            asyncio.get_running_loop().create_task(decode.table.end(reservation, TransferState.RELEASED, "client cancelled"))
            return reservation

        decode.reserve = reserve_then_cancel
        with pytest.raises(grpc.aio.AioRpcError):
            await transfer(decode, "r", layer_push=False)
        return decode, before

    decode, before = run(main())
    assert torch.equal(decode.runner.kv_pool, before)
    assert len(decode.free_list) == NUM_BLOCKS
