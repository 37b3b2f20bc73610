"""The `nccl` transport: a two-rank NCCL communicator per prefill/decode pair, pages sent point to point.

    prefill, first transfer to a decode worker:  ncclGetUniqueId -> Decode.ConnectKV(unique_id, comm_id)
                                                 and ncclCommInitRank(rank 0) together; decode joins as rank 1
    prefill, per layer:  a KVChunk (out of band, nccl_seq, comm_id) over PushKV, then ncclSend of the
                         gathered pages on the pair's dedicated stream
    decode, per chunk:   validate, check nccl_seq is the next one, ncclRecv into a buffer on its dedicated
                         stream, scatter into the reserved blocks, wait for it, record the layer

The unique id travels over our gRPC control plane; there is no TCPStore and no torch.distributed group.
Transfers on one communicator are serialized by the sender (a lock per pair), so sends and receives are
posted in the same order on both sides; `nccl_seq` checks it. Any failure or timeout aborts the
communicator (ncclCommAbort) so no GPU work waits forever, and the next transfer creates a new one.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from stageserve.common import tracing
from stageserve.common.errors import DeadlineExceededError, InvalidArgumentError
from stageserve.transport.base import KVDescriptor, KVLayout, KVSender, KVSource, TransferStats, dtype_to_pb, indexed
from stageserve.transport.checksum import page_checksum
from stageserve.transport.cuda_ipc import find_library, struct_from_bytes, struct_to_bytes
from stageserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

logger = logging.getLogger(__name__)

UNIQUE_ID_BYTES = 128  # sizeof(ncclUniqueId)
_NCCL_UINT8 = 1  # ncclUint8: pages travel as bytes, whatever their dtype
_POLL_S = 0.0002


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * UNIQUE_ID_BYTES)]


@lru_cache(maxsize=1)
def find_libnccl() -> str | None:
    """The copy torch loaded, else torch's bundled nvidia-nccl package (nvidia/nccl/lib or nvidia/cu13/lib),
    else the system's."""
    path = find_library("libnccl", "")
    return path if path and (os.path.exists(path) or ctypes.util.find_library("nccl")) else None


class NcclLibrary:
    """A thin ctypes binding to the libnccl calls a point-to-point pair needs (as vLLM's pynccl does)."""

    def __init__(self, path: str | None = None):
        path = path or find_libnccl()
        if path is None:
            raise RuntimeError("libnccl.so not found")
        self.lib = ctypes.CDLL(path)
        self.lib.ncclGetErrorString.restype = ctypes.c_char_p
        self.lib.ncclCommInitRank.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, _UniqueId, ctypes.c_int]
        for fn in (self.lib.ncclSend, self.lib.ncclRecv):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self.lib.ncclCommAbort.argtypes = [ctypes.c_void_p]

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what}: NCCL error {code} ({self.lib.ncclGetErrorString(code).decode()})")

    def unique_id(self) -> bytes:
        uid = _UniqueId()
        self._check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return struct_to_bytes(uid)

    def init_rank(self, unique_id: bytes, rank: int, device: torch.device) -> int:
        """Blocks until both ranks joined; call it off the event loop."""
        torch.cuda.set_device(device)
        comm = ctypes.c_void_p()
        self._check(self.lib.ncclCommInitRank(ctypes.byref(comm), 2, struct_from_bytes(_UniqueId, unique_id), rank), "ncclCommInitRank")
        return comm.value

    def send(self, comm: int, tensor: torch.Tensor, peer: int, stream: torch.cuda.Stream) -> None:
        self._check(self.lib.ncclSend(tensor.data_ptr(), tensor.numel() * tensor.element_size(), _NCCL_UINT8, peer,
                                      comm, stream.cuda_stream), "ncclSend")

    def recv(self, comm: int, tensor: torch.Tensor, peer: int, stream: torch.cuda.Stream) -> None:
        self._check(self.lib.ncclRecv(tensor.data_ptr(), tensor.numel() * tensor.element_size(), _NCCL_UINT8, peer,
                                      comm, stream.cuda_stream), "ncclRecv")

    def abort(self, comm: int) -> None:
        self.lib.ncclCommAbort(comm)


@dataclass
class Communicator:
    comm_id: str
    handle: int
    rank: int
    stream: torch.cuda.Stream
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_seq: int = 0
    broken: bool = False

    @property
    def peer(self) -> int:
        return 1 - self.rank


async def wait_event(event: torch.cuda.Event, timeout_s: float, what: str) -> None:
    """Poll rather than block a thread: an NCCL op whose peer died never completes, and we abort it instead."""
    deadline = time.monotonic() + timeout_s
    while not event.query():
        if time.monotonic() > deadline:
            raise DeadlineExceededError(f"nccl: {what} did not complete within {timeout_s:g} s")
        await asyncio.sleep(_POLL_S)


class NcclEndpoint:
    """One worker's communicators, by comm id (decode) or by peer address (prefill)."""

    def __init__(self, device: torch.device, library: NcclLibrary | None = None):
        self.device = indexed(device)
        self.nccl = library or NcclLibrary()
        self.comms: dict[str, Communicator] = {}

    async def join(self, unique_id: bytes, comm_id: str, rank: int, timeout_s: float) -> Communicator:
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise InvalidArgumentError("unique_id", f"{len(unique_id)} bytes, expected {UNIQUE_ID_BYTES}")
        if not comm_id:
            raise InvalidArgumentError("comm_id", "must not be empty")
        try:
            handle = await asyncio.wait_for(asyncio.to_thread(self.nccl.init_rank, unique_id, rank, self.device), timeout_s)
        except TimeoutError:
            raise DeadlineExceededError(f"nccl: communicator {comm_id} not up within {timeout_s:g} s") from None
        comm = Communicator(comm_id, handle, rank, torch.cuda.Stream(self.device))
        self.comms[comm_id] = comm
        logger.info("nccl: communicator %s up (rank %d)", comm_id, rank)
        return comm

    def drop(self, key: str, reason: str) -> None:
        comm = self.comms.pop(key, None)
        if comm is not None and not comm.broken:
            comm.broken = True
            logger.warning("nccl: aborting communicator %s: %s", comm.comm_id, reason)
            self.nccl.abort(comm.handle)

    async def receive(self, chunk: common_pb2.KVChunk, layout: KVLayout, pool: torch.Tensor, timeout_s: float) -> None:
        """Decode side: the pages of one out-of-band chunk, received and scattered into `pool[layer]`."""
        comm = self.comms.get(chunk.comm_id)
        if comm is None or comm.broken:
            raise InvalidArgumentError("kv_chunk.comm_id", f"no communicator {chunk.comm_id!r}")
        if chunk.nccl_seq != comm.next_seq:
            self.drop(chunk.comm_id, f"chunk seq {chunk.nccl_seq}, expected {comm.next_seq}")
            raise InvalidArgumentError("kv_chunk.nccl_seq", f"expected {comm.next_seq}, got {chunk.nccl_seq}")
        comm.next_seq += 1
        ids = torch.tensor(list(chunk.block_ids), dtype=torch.int64, device=self.device)
        buffer = torch.empty(layout.page_shape(len(ids)), dtype=layout.dtype, device=self.device)
        comm.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(comm.stream):
            self.nccl.recv(comm.handle, buffer, comm.peer, comm.stream)
            pool[chunk.layer_index].index_copy_(1, ids, buffer)
            done = comm.stream.record_event()
        try:
            await wait_event(done, timeout_s, f"receive of layer {chunk.layer_index}")
        except DeadlineExceededError as exc:
            self.drop(chunk.comm_id, str(exc))
            raise


class NcclKVSender(KVSender):
    name = "nccl"

    def __init__(self, channel_for: callable, device: torch.device, connect_timeout_s: float = 30.0):
        self.channel_for = channel_for
        self.endpoint = NcclEndpoint(device)
        self.device = self.endpoint.device
        self.connect_timeout_s = connect_timeout_s
        self.connecting: dict[str, asyncio.Lock] = {}

    async def _comm(self, address: str) -> Communicator:
        """The communicator with the decode worker at `address`, created on first use."""
        async with self.connecting.setdefault(address, asyncio.Lock()):
            comm = self.endpoint.comms.get(address)
            if comm is not None and not comm.broken:
                return comm
            unique_id, comm_id = self.endpoint.nccl.unique_id(), uuid.uuid4().hex
            stub = decode_pb2_grpc.DecodeStub(self.channel_for(address))
            request = decode_pb2.ConnectKVRequest(unique_id=unique_id, comm_id=comm_id,
                                                  timeout_ms=int(self.connect_timeout_s * 1000))
            remote = stub.ConnectKV(request, timeout=self.connect_timeout_s, metadata=tracing.outgoing_metadata())
            comm, _ = await asyncio.gather(self.endpoint.join(unique_id, comm_id, 0, self.connect_timeout_s), remote)
            self.endpoint.comms[address] = self.endpoint.comms.pop(comm_id)
            return comm

    async def send(self, descriptor: KVDescriptor, src_block_ids: list[int], source: KVSource, timeout_s: float):
        layout = descriptor.layout
        if len(src_block_ids) != len(descriptor.block_ids):
            raise InvalidArgumentError("kv.block_ids", f"{len(descriptor.block_ids)} blocks reserved, {len(src_block_ids)} to send")
        comm = await self._comm(descriptor.address)
        stats = TransferStats(self.name, num_blocks=len(src_block_ids), num_layers=layout.num_layers,
                              checksum=source.device_checksum)
        start = time.monotonic()
        stub = decode_pb2_grpc.DecodeStub(self.channel_for(descriptor.address))
        async with comm.lock:  # one transfer at a time per pair: sends and receives pair up in order
            try:
                sent: list[torch.Tensor] = []  # kept alive until the stream has sent them
                chunks = self._chunks(descriptor, src_block_ids, source, comm, stats, sent)
                response = await stub.PushKV(chunks, timeout=timeout_s, metadata=tracing.outgoing_metadata())
                with torch.cuda.stream(comm.stream):
                    done = comm.stream.record_event()
                await wait_event(done, timeout_s, "send")
            except BaseException as exc:
                self.endpoint.drop(descriptor.address, f"transfer failed: {exc!r}")
                raise
        stats.seconds = time.monotonic() - start
        if response.num_chunks != stats.num_chunks:
            raise RuntimeError(f"receiver acknowledged {response.num_chunks} chunks of {stats.num_chunks}")
        return stats

    async def _chunks(self, descriptor, src, source: KVSource, comm: Communicator, stats, sent):
        layout = descriptor.layout
        src_ids = torch.tensor(src, dtype=torch.int64, device=self.device)
        comm.stream.wait_stream(torch.cuda.current_stream(self.device))
        for layer in range(layout.num_layers):
            if source.feed is not None:  # still computing: send each layer as soon as its forward is queued
                comm.stream.wait_event(await source.feed.ready(layer))
            with torch.cuda.stream(comm.stream):
                pages = source.pool[layer].index_select(1, src_ids)  # [2, n, block_size, kv_heads, head_dim]
            chunk = common_pb2.KVChunk(
                reservation_id=descriptor.reservation_id, layer_index=layer, block_ids=descriptor.block_ids,
                dtype=dtype_to_pb(layout.dtype), shape=layout.page_shape(len(src)), chunk_index=stats.num_chunks,
                final=layer == layout.num_layers - 1, out_of_band=True, nccl_seq=comm.next_seq, comm_id=comm.comm_id,
            )
            if source.device_checksum:
                with torch.cuda.stream(comm.stream):
                    chunk.page_checksum = page_checksum(pages)
            comm.next_seq += 1
            stats.num_chunks += 1
            stats.num_bytes += pages.numel() * pages.element_size()
            yield chunk  # the receiver posts its ncclRecv when this arrives; our send is queued right after
            with torch.cuda.stream(comm.stream):
                self.endpoint.nccl.send(comm.handle, pages, comm.peer, comm.stream)
            sent.append(pages)
