"""The `cuda-ipc` transport: prefill copies its pages straight into decode's pool, GPU to GPU.

    decode, once at start:   export_pool(pool) -> IpcPool (cudaIpcGetMemHandle of the pool's allocation,
                             the byte offset of the pool in it, its strides), sent in every descriptor as
                             plain proto fields (64 handle bytes and integers, never a pickle)
    prefill, once per pool:  cudaIpcOpenMemHandle -> a tensor view of decode's whole pool
    prefill, per request:    one WriteKV stream: claim the reservation's blocks and wait for `claimed`;
                             then one gather/scatter launch for every layer (or one per layer with layer
                             push) on a dedicated stream, wait for it, and an out-of-band KVChunk (one for
                             all layers, or one per layer) says the pages are in place; decode validates it
                             like any chunk, records it and answers the final one with `done`

Same host only (the descriptor's host id must equal ours): the same GPU, or a peer GPU in the same
host (cudaIpcMemLazyEnablePeerAccess). The pool is one allocation so one handle covers every layer.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import glob
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import torch

from stageserve.common import tracing
from stageserve.common.errors import InvalidArgumentError
from stageserve.transport.base import (
    KVDescriptor,
    KVLayout,
    KVSender,
    KVSource,
    TransferStats,
    TransportUnusable,
    dtype_to_pb,
    indexed,
)
from stageserve.transport.checksum import page_checksum
from stageserve.transport.select import host_id
from stageserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

logger = logging.getLogger(__name__)

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
_LAZY_ENABLE_PEER_ACCESS = 1
_CU_POINTER_ATTRIBUTE_RANGE_START_ADDR = 11
_CU_POINTER_ATTRIBUTE_RANGE_SIZE = 12


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_byte * IPC_HANDLE_BYTES)]


def struct_to_bytes(value: ctypes.Structure) -> bytes:
    """All of a struct's bytes (a char-array field would stop at the first NUL)."""
    return ctypes.string_at(ctypes.addressof(value), ctypes.sizeof(value))


def struct_from_bytes(kind: type, data: bytes) -> ctypes.Structure:
    if len(data) != ctypes.sizeof(kind):
        raise ValueError(f"{kind.__name__} needs {ctypes.sizeof(kind)} bytes, got {len(data)}")
    value = kind()
    ctypes.memmove(ctypes.addressof(value), data, len(data))
    return value


def find_library(stem: str, fallback: str) -> str:
    """The copy of `stem` this process already loaded (torch's), else torch's nvidia package's, else the system's."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if f"/{stem}.so" in path:
                    return path
    except OSError:
        pass
    import site

    for root in site.getsitepackages():  # nvidia/cuda_runtime/lib (CUDA 12 wheels) or nvidia/cu13/lib (13)
        found = sorted(glob.glob(os.path.join(root, "nvidia", "**", f"{stem}.so*"), recursive=True))
        if found:
            return found[0]
    return ctypes.util.find_library(stem.removeprefix("lib")) or fallback


class CudaRuntime:
    """The few CUDA runtime/driver calls IPC needs, through ctypes; each failure raises with CUDA's message."""

    def __init__(self):
        torch.cuda.init()
        self.rt = ctypes.CDLL(find_library("libcudart", "libcudart.so"))
        self.drv = ctypes.CDLL("libcuda.so.1")
        self.rt.cudaGetErrorString.restype = ctypes.c_char_p
        self.rt.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _IpcHandle, ctypes.c_uint]
        self.rt.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_void_p]
        self.rt.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        self.drv.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what}: CUDA error {code} ({self.rt.cudaGetErrorString(code).decode()})")

    def allocation_range(self, device: int, ptr: int) -> tuple[int, int]:
        """(base, size) of the cudaMalloc allocation holding `ptr`: the handle covers the whole of it."""
        self._check(self.rt.cudaSetDevice(device), "cudaSetDevice")  # makes the primary context current here
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        code = self.drv.cuPointerGetAttribute(ctypes.byref(base), _CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, ptr)
        if code != 0:
            raise RuntimeError(f"cuPointerGetAttribute(RANGE_START_ADDR): CUDA driver error {code}")
        code = self.drv.cuPointerGetAttribute(ctypes.byref(size), _CU_POINTER_ATTRIBUTE_RANGE_SIZE, ptr)
        if code != 0:
            raise RuntimeError(f"cuPointerGetAttribute(RANGE_SIZE): CUDA driver error {code}")
        return base.value, size.value

    def get_handle(self, device: int, base: int) -> bytes:
        handle = _IpcHandle()
        self._check(self.rt.cudaSetDevice(device), "cudaSetDevice")
        self._check(self.rt.cudaIpcGetMemHandle(ctypes.byref(handle), ctypes.c_void_p(base)), "cudaIpcGetMemHandle")
        return struct_to_bytes(handle)

    def open_handle(self, device: int, handle: bytes) -> int:
        pointer = ctypes.c_void_p()
        self._check(self.rt.cudaSetDevice(device), "cudaSetDevice")
        self._check(
            self.rt.cudaIpcOpenMemHandle(ctypes.byref(pointer), struct_from_bytes(_IpcHandle, handle), _LAZY_ENABLE_PEER_ACCESS),
            "cudaIpcOpenMemHandle",
        )
        return pointer.value

    def close_handle(self, pointer: int) -> None:
        self._check(self.rt.cudaIpcCloseMemHandle(ctypes.c_void_p(pointer)), "cudaIpcCloseMemHandle")


@dataclass(frozen=True)
class IpcPool:
    """Everything a peer needs to map a decode worker's pool: the handle and where the pool sits in it."""

    host_id: str
    device_index: int
    handle: bytes
    pool_id: str
    base_offset: int
    layer_stride_bytes: int
    num_blocks: int
    allocation_bytes: int

    def to_pb(self) -> common_pb2.CudaIpcTransportParams:
        return common_pb2.CudaIpcTransportParams(
            host_id=self.host_id, device_index=self.device_index, ipc_handle=self.handle, pool_id=self.pool_id,
            base_offset=self.base_offset, layer_stride_bytes=self.layer_stride_bytes, num_blocks=self.num_blocks,
            allocation_bytes=self.allocation_bytes,
        )

    @classmethod
    def from_pb(cls, pb: common_pb2.CudaIpcTransportParams, layout: KVLayout) -> IpcPool:
        """Check every field against the layout before any of it is used to map or touch memory."""
        if len(pb.ipc_handle) != IPC_HANDLE_BYTES:
            raise InvalidArgumentError("kv.cuda_ipc.ipc_handle", f"{len(pb.ipc_handle)} bytes, expected {IPC_HANDLE_BYTES}")
        if not pb.pool_id:
            raise InvalidArgumentError("kv.cuda_ipc.pool_id", "must not be empty")
        if pb.num_blocks < 1:
            raise InvalidArgumentError("kv.cuda_ipc.num_blocks", "must be >= 1")
        stride = layout.bytes_per_block_layer * pb.num_blocks
        if pb.layer_stride_bytes != stride:
            raise InvalidArgumentError("kv.cuda_ipc.layer_stride_bytes", f"{pb.layer_stride_bytes}, the layout needs {stride}")
        end = pb.base_offset + stride * layout.num_layers
        if end > pb.allocation_bytes:
            raise InvalidArgumentError("kv.cuda_ipc.allocation_bytes", f"pool ends at byte {end}, past the allocation's {pb.allocation_bytes}")
        if pb.base_offset % layout.dtype.itemsize:
            raise InvalidArgumentError("kv.cuda_ipc.base_offset", "not aligned to the dtype")
        return cls(pb.host_id, pb.device_index, bytes(pb.ipc_handle), pb.pool_id, pb.base_offset,
                   pb.layer_stride_bytes, pb.num_blocks, pb.allocation_bytes)


def export_pool(pool: torch.Tensor, runtime: CudaRuntime | None = None) -> IpcPool:
    """Export a `[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]` pool (decode side, once)."""
    if pool.device.type != "cuda" or not pool.is_contiguous():
        raise ValueError("cuda-ipc exports a contiguous CUDA pool")
    runtime = runtime or CudaRuntime()
    device = pool.device.index or 0
    base, size = runtime.allocation_range(device, pool.data_ptr())
    handle = runtime.get_handle(device, base)
    return IpcPool(host_id(), device, handle, uuid.uuid4().hex, pool.data_ptr() - base,
                   pool[0].numel() * pool.element_size(), pool.shape[2], size)


class _DevicePointer:
    """A raw device allocation seen as a uint8 array, for torch.as_tensor (`__cuda_array_interface__`)."""

    def __init__(self, pointer: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (pointer, False), "strides": None, "version": 2,
        }


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """dst[..., dst_ids[i], :] = src[..., src_ids[i], :] along dim -4 (the block dim).

    src, dst: `[2, num_blocks, block_size, kv_heads, head_dim]` (one layer) or with a leading layer dim.
    On one GPU the Triton kernel does it in one pass; elsewhere torch gathers then scatters.
    """
    if src.is_cuda and src.device == dst.device and src.is_contiguous() and dst.is_contiguous():
        from stageserve.kernels.block_copy import copy_blocks as copy_blocks_kernel

        copy_blocks_kernel(src, dst, src_ids, dst_ids)
    else:  # (kernels/block_copy.py's reference; not imported here, so a CPU install needs no Triton)
        dim = src.dim() - 4
        dst.index_copy_(dim, dst_ids, src.index_select(dim, src_ids))


class CudaIpcKVSender(KVSender):
    name = "cuda-ipc"

    def __init__(self, channel_for: callable, device: torch.device, layer_push: bool = True, claim_s: float = 5.0):
        self.channel_for = channel_for
        self.device = indexed(device)
        self.claim_s = claim_s  # longest our copies may take; decode frees the blocks after it whatever happens
        self.layer_push = layer_push  # one copy and notice per layer (pipelined) vs one copy for every layer
        self.runtime: CudaRuntime | None = None
        self.stream: torch.cuda.Stream | None = None
        self.pools: dict[str, torch.Tensor] = {}  # pool_id -> a view of that decode worker's pool
        self.unusable: dict[str, str] = {}  # pool_id -> why it could not be mapped
        self.peer_streams: dict[torch.device, torch.cuda.Stream] = {}  # for pools on a peer GPU

    def _pool(self, ipc: IpcPool, layout: KVLayout) -> torch.Tensor:
        view = self.pools.get(ipc.pool_id)
        if view is None:
            if self.runtime is None:
                self.runtime = CudaRuntime()
            # Mapped in the owning GPU's context (both processes number GPUs alike: same host, same
            # CUDA_VISIBLE_DEVICES), so the scatter runs there; a peer pool gets a peer-to-peer copy first.
            if not 0 <= ipc.device_index < torch.cuda.device_count():
                raise InvalidArgumentError("kv.cuda_ipc.device_index", f"{ipc.device_index} is not a GPU of this process")
            owner = torch.device("cuda", ipc.device_index)
            with torch.cuda.device(owner):  # cudaSetDevice inside must not change this thread's device
                pointer = self.runtime.open_handle(ipc.device_index, ipc.handle)
                raw = torch.as_tensor(_DevicePointer(pointer, ipc.allocation_bytes), device=owner)
            if raw.data_ptr() != pointer or raw.device != owner:  # a copy would swallow every write
                raise RuntimeError(f"the mapped pool came back as a tensor at {raw.data_ptr():#x} on {raw.device}")
            shape = (layout.num_layers, *layout.page_shape(ipc.num_blocks))
            nbytes = ipc.layer_stride_bytes * layout.num_layers
            view = raw[ipc.base_offset : ipc.base_offset + nbytes].view(layout.dtype).view(shape)
            self.pools[ipc.pool_id] = view
            logger.info("cuda-ipc: mapped pool %s (%d MiB) of the decode worker on device %d",
                        ipc.pool_id, nbytes >> 20, ipc.device_index)
        return view

    async def send(self, descriptor: KVDescriptor, src_block_ids: list[int], source: KVSource, timeout_s: float):
        layout = descriptor.layout
        if descriptor.cuda_ipc is None:
            raise InvalidArgumentError("kv.cuda_ipc", "missing from a cuda-ipc descriptor")
        ipc = IpcPool.from_pb(descriptor.cuda_ipc, layout)
        if ipc.host_id != host_id():
            raise TransportUnusable(f"cuda-ipc: decode runs on host {ipc.host_id!r}, not this one")
        if len(src_block_ids) != len(descriptor.block_ids):
            raise InvalidArgumentError("kv.block_ids", f"{len(descriptor.block_ids)} blocks reserved, {len(src_block_ids)} to send")
        if any(not 0 <= b < ipc.num_blocks for b in descriptor.block_ids) or len(set(descriptor.block_ids)) != len(descriptor.block_ids):
            raise InvalidArgumentError("kv.block_ids", f"must be distinct and in [0, {ipc.num_blocks})")
        pool = source.pool
        if pool is None or pool.dtype != layout.dtype or tuple(pool.shape) != (layout.num_layers, *layout.page_shape(pool.shape[2])):
            raise InvalidArgumentError("kv.layout", "the local pool does not have the descriptor's layout")
        if ipc.pool_id in self.unusable:
            raise TransportUnusable(f"cuda-ipc: {self.unusable[ipc.pool_id]}")
        try:
            dst = self._pool(ipc, layout)
        except (RuntimeError, OSError) as exc:  # e.g. a sandbox without CUDA IPC: say why once, then use host
            self.unusable[ipc.pool_id] = f"cannot map decode's pool: {exc}"
            logger.warning("cuda-ipc: %s; this decode worker gets the host transport from now on", self.unusable[ipc.pool_id])
            raise TransportUnusable(f"cuda-ipc: {self.unusable[ipc.pool_id]}") from exc
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        stats = TransferStats(self.name, num_blocks=len(src_block_ids), num_layers=layout.num_layers,
                              checksum=source.device_checksum)
        start = time.monotonic()
        src_ids, dst_ids = self._block_ids(src_block_ids, descriptor.block_ids)  # lands during the claim's round trip
        stub = decode_pb2_grpc.DecodeStub(self.channel_for(descriptor.address))
        call = stub.WriteKV(timeout=timeout_s, metadata=tracing.outgoing_metadata())
        claimed = False
        try:
            claim = decode_pb2.ClaimKVRequest(reservation_id=descriptor.reservation_id,
                                              lease_ms=int(self.claim_s * 1000), block_ids=descriptor.block_ids)
            await call.write(decode_pb2.KVWrite(claim=claim))
            ack = await asyncio.wait_for(call.read(), min(timeout_s, self.claim_s))
            if ack is grpc.aio.EOF or ack.WhichOneof("kind") != "claimed":
                raise RuntimeError(f"decode did not grant the claim (got {ack})")
            claimed = True
            stats.claim_seconds = time.monotonic() - start
            async for chunk in self._copy_and_notify(descriptor, source, dst, src_ids, dst_ids, stats):
                await call.write(decode_pb2.KVWrite(landed=chunk))
            await call.done_writing()
            ack = await call.read()
            if ack is grpc.aio.EOF or ack.WhichOneof("kind") != "done":
                raise RuntimeError(f"decode did not acknowledge the transfer (got {ack})")
        except BaseException as exc:
            if claimed:  # once our copies are over, decode may free the blocks
                self._finish_copies()
                await asyncio.shield(self._give_up(call, f"{type(exc).__name__}: {exc}"))
            call.cancel()
            raise
        stats.seconds = time.monotonic() - start
        if ack.done.num_chunks != stats.num_chunks:
            raise RuntimeError(f"receiver acknowledged {ack.done.num_chunks} chunks of {stats.num_chunks}")
        return stats

    @staticmethod
    async def _give_up(call, reason: str) -> None:
        """Best effort, bounded: tell decode on the same stream that we stopped (it may already have failed it)."""
        try:
            await asyncio.wait_for(call.write(decode_pb2.KVWrite(abort_reason=reason[:500])), 1.0)
            await asyncio.wait_for(call.done_writing(), 1.0)
        except Exception as exc:  # the call may already have ended (decode failed it): nothing more to say
            logger.info("cuda-ipc: could not tell decode the transfer stopped: %s", type(exc).__name__)

    def _block_ids(self, src: list[int], dst: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both id lists as int64 device tensors: one pinned host-to-device copy, queued on our stream."""
        host = torch.tensor([list(src), list(dst)], dtype=torch.int64).pin_memory()
        with torch.cuda.stream(self.stream):
            ids = host.to(self.device, non_blocking=True)  # [2, n]
        return ids[0], ids[1]

    async def _copy_and_notify(
        self, descriptor: KVDescriptor, source: KVSource, dst: torch.Tensor, src_ids: torch.Tensor,
        dst_ids: torch.Tensor, stats: TransferStats,
    ) -> AsyncIterator[common_pb2.KVChunk]:
        """Queue the copies, and yield one notice per group of layers once that group's copy is over:
        one group of every layer (one launch) for a whole-request push, one per layer for a layer push."""
        layout, stream = descriptor.layout, self.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the pages were written on the engine's stream
        groups = [[layer] for layer in range(layout.num_layers)] if self.layer_push else [list(range(layout.num_layers))]
        timing = source.feed is None and dst.device == self.device  # copies back to back: time them as a whole
        if timing:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
        try:
            if source.feed is None:
                done = [self._copy(source, dst, src_ids, dst_ids, layers) for layers in groups]  # all queued at once
                if timing:
                    end.record(stream)
            for i, layers in enumerate(groups):
                if source.feed is not None:  # still computing: copy each layer as soon as its forward is queued
                    for layer in layers:
                        stream.wait_event(await source.feed.ready(layer))
                    event, _alive = self._copy(source, dst, src_ids, dst_ids, layers)
                else:
                    event, _alive = done[i]
                await asyncio.to_thread(event.synchronize)
                if timing and i == len(groups) - 1:
                    end.synchronize()
                    stats.device_seconds = begin.elapsed_time(end) / 1e3
                yield self._notice(descriptor, source, src_ids, layers, stats)
        finally:  # cancelled or failed midway: our copies still finish before the claim is let go
            self._finish_copies()

    def _finish_copies(self) -> None:
        for stream in (self.stream, *self.peer_streams.values()):
            stream.synchronize()

    def _copy(self, source: KVSource, dst, src_ids, dst_ids, layers: list[int]) -> tuple[torch.cuda.Event, object]:
        """Queue the copy of `layers`; returns the event after it and what must stay alive until then."""
        first, last = layers[0], layers[-1] + 1
        with torch.cuda.stream(self.stream):
            if dst.device == self.device:
                copy_blocks(source.pool[first:last], dst[first:last], src_ids, dst_ids)
                return self.stream.record_event(), None
            pages = source.pool[first:last].index_select(2, src_ids)  # [layers, 2, n, block_size, heads, dim]
            gathered = self.stream.record_event()
        peer = self.peer_streams.setdefault(dst.device, torch.cuda.Stream(dst.device))
        with torch.cuda.device(dst.device), torch.cuda.stream(peer):
            peer.wait_event(gathered)
            moved = pages.to(dst.device, non_blocking=True)  # one peer-to-peer copy, then the scatter there
            dst[first:last].index_copy_(2, dst_ids.to(dst.device, non_blocking=True), moved)
            return peer.record_event(), (pages, moved)

    def _notice(self, descriptor, source, src_ids, layers: list[int], stats) -> common_pb2.KVChunk:
        """The out-of-band chunk saying `layers` of every block are in place (one chunk for a run of layers)."""
        layout, n = descriptor.layout, src_ids.numel()
        first, last = layers[0], layers[-1] + 1
        chunk = common_pb2.KVChunk(
            reservation_id=descriptor.reservation_id, layer_index=first, num_layers=last - first if last - first > 1 else 0,
            block_ids=descriptor.block_ids, dtype=dtype_to_pb(layout.dtype), shape=layout.page_shape(n),
            chunk_index=stats.num_chunks, final=last == layout.num_layers, out_of_band=True,
        )
        if source.device_checksum:  # after the copy, on its stream; timed apart from it
            checksum_start = time.monotonic()
            with torch.cuda.stream(self.stream):
                chunk.page_checksum = page_checksum(source.pool[first:last].index_select(2, src_ids))
            stats.checksum_seconds += time.monotonic() - checksum_start
        stats.num_chunks += 1
        stats.num_bytes += layout.bytes_per_block_layer * n * (last - first)
        return chunk
