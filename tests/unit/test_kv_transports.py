"""Transport choice, and the checks the GPU transports make before touching memory (CPU, no GPU needed)."""

from __future__ import annotations

import logging

import pytest
import torch

from stageserve.common.errors import InvalidArgumentError
from stageserve.transport.base import KVLayout
from stageserve.transport.checksum import page_checksum
from stageserve.transport.cuda_ipc import IPC_HANDLE_BYTES, IpcPool, copy_blocks
from stageserve.transport.select import choose_for_peer, host_id, served_transports
from stageserve.v1 import common_pb2

LAYOUT = KVLayout(num_layers=4, block_size=16, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
CPU = torch.device("cpu")


def test_auto_on_cpu_serves_host_and_says_so(caplog):
    with caplog.at_level(logging.INFO):
        assert served_transports("auto", CPU) == ("host",)
    assert "host transport" in caplog.text


@pytest.mark.parametrize("name", ["cuda-ipc", "nccl"])
def test_a_gpu_transport_on_a_cpu_worker_is_a_clear_error(name):
    with pytest.raises(InvalidArgumentError, match=f"kv_transport: {name} moves pages between GPUs.*--kv-transport host"):
        served_transports(name, CPU)


def test_an_explicit_transport_keeps_host_as_the_fallback():
    assert served_transports("host", CPU) == ("host",)
    with pytest.raises(InvalidArgumentError, match="not one of"):
        served_transports("carrier-pigeon", CPU)


@pytest.mark.parametrize("device", [CPU, torch.device("cuda", 0)])
def test_tensor_parallel_workers_move_kv_over_host_only(device):
    assert served_transports("auto", device, tensor_parallel_size=2) == ("host",)
    with pytest.raises(InvalidArgumentError, match="kv_transport: cuda-ipc moves one GPU's pool.*tensor_parallel_size=2"):
        served_transports("cuda-ipc", device, tensor_parallel_size=2)


def test_receiver_picks_the_senders_preference_and_skips_ipc_across_hosts():
    served = ("cuda-ipc", "nccl", "host")
    assert choose_for_peer(served, [], "") == "cuda-ipc"
    assert choose_for_peer(served, [], host_id()) == "cuda-ipc"
    assert choose_for_peer(served, [], "another-host/boot") == "nccl"
    assert choose_for_peer(served, ["host"], "") == "host"
    with pytest.raises(InvalidArgumentError, match="transports"):
        choose_for_peer(("host",), ["nccl"], "")


def ipc_params(**overrides) -> common_pb2.CudaIpcTransportParams:
    stride = LAYOUT.bytes_per_block_layer * 100
    values = dict(host_id=host_id(), device_index=0, ipc_handle=bytes(IPC_HANDLE_BYTES), pool_id="p", base_offset=512,
                  layer_stride_bytes=stride, num_blocks=100, allocation_bytes=512 + stride * LAYOUT.num_layers)
    values.update(overrides)
    return common_pb2.CudaIpcTransportParams(**values)


def test_ipc_params_that_fit_the_layout_are_accepted():
    pool = IpcPool.from_pb(ipc_params(), LAYOUT)
    assert pool.num_blocks == 100 and pool.base_offset == 512 and len(pool.handle) == IPC_HANDLE_BYTES


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"ipc_handle": bytes(63)}, "ipc_handle"),
        ({"pool_id": ""}, "pool_id"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"layer_stride_bytes": 4096}, "layer_stride_bytes"),  # a different head shape or dtype
        ({"allocation_bytes": 1024}, "allocation_bytes"),  # the pool would run past the mapping
        ({"base_offset": 513, "allocation_bytes": 1 << 40}, "base_offset"),
    ],
)
def test_ipc_params_are_checked_before_any_mapping(overrides, field):
    with pytest.raises(InvalidArgumentError, match=f"kv.cuda_ipc.{field}"):
        IpcPool.from_pb(ipc_params(**overrides), LAYOUT)


def test_copy_blocks_moves_exactly_the_named_blocks_for_every_layer():
    src = torch.randn(LAYOUT.num_layers, *LAYOUT.page_shape(10)).to(torch.bfloat16)
    dst = torch.full((LAYOUT.num_layers, *LAYOUT.page_shape(12)), float("nan"), dtype=torch.bfloat16)
    before = dst.clone()
    src_ids, dst_ids = torch.tensor([7, 0, 3]), torch.tensor([11, 2, 5])
    copy_blocks(src, dst, src_ids, dst_ids)  # all layers at once
    copy_blocks(src[1], dst[1], src_ids, dst_ids)  # one layer
    for s, d in zip(src_ids.tolist(), dst_ids.tolist()):
        assert torch.equal(dst[:, :, d], src[:, :, s])
    untouched = [b for b in range(12) if b not in dst_ids.tolist()]
    assert torch.equal(dst[:, :, untouched].isnan(), before[:, :, untouched].isnan())


def test_page_checksum_sees_flips_and_swaps_and_ignores_nothing():
    pages = torch.randn(2, 4, 16, 2, 8)
    base = page_checksum(pages)
    assert page_checksum(pages.clone()) == base
    flipped = pages.clone().view(torch.int32)
    flipped.view(-1)[100] ^= 1
    assert page_checksum(flipped.view(torch.float32)) != base
    assert page_checksum(pages[:, [1, 0, 2, 3]]) != base  # two blocks swapped
    assert page_checksum(pages.to(torch.bfloat16)) != page_checksum(pages.to(torch.bfloat16).roll(1))


def test_handles_and_unique_ids_keep_every_byte_through_ctypes():
    from stageserve.transport.cuda_ipc import _IpcHandle, struct_from_bytes, struct_to_bytes
    from stageserve.transport.nccl import UNIQUE_ID_BYTES, _UniqueId

    for kind, size in ((_IpcHandle, IPC_HANDLE_BYTES), (_UniqueId, UNIQUE_ID_BYTES)):
        data = bytes([0, 7, 0, 0, 255]) + bytes(range(size - 5))  # NULs early, as real handles have
        assert struct_to_bytes(struct_from_bytes(kind, data)) == data
        with pytest.raises(ValueError):
            struct_from_bytes(kind, data[:-1])


def test_decode_drops_a_gpu_transport_it_cannot_set_up_under_auto_and_refuses_it_by_name(caplog):
    from stageserve.decode.service import DecodeServicer
    from stageserve.engine.config import EngineConfig
    from stageserve.engine.factory import create_engine
    from stageserve.engine.worker import EngineWorker

    worker = EngineWorker(create_engine("dummy:tiny", EngineConfig(device="cpu", num_blocks=16)))
    with caplog.at_level(logging.WARNING):
        servicer = DecodeServicer(worker, 30.0, transports=("cuda-ipc", "host"), strict=False)
    assert servicer.transports == ("host",) and servicer.ipc_pool is None
    assert "cuda-ipc unavailable here" in caplog.text
    with pytest.raises(InvalidArgumentError, match="kv_transport: cuda-ipc cannot start on this machine"):
        DecodeServicer(worker, 30.0, transports=("cuda-ipc", "host"), strict=True)
