"""The KVTransport interface: how a prefill worker's KV pages reach a decode worker's pool.

    gateway          decode worker                         prefill worker
    -------          -------------                         --------------
    Reserve    --->  allocate blocks, return a
                     KVDescriptor (transport, reservation,
                     block ids, layout)
    Prefill(descriptor) ---------------------------------> compute the prompt's KV
                     <--- KVSender.send(): pages, layer by layer, into the reserved blocks
                     KVReceiver validates every page against the reservation and its own pool
                     before writing; `complete()` once every layer of every block has landed
    Attach     --->  the sequence joins the running batch

A transport moves bytes and nothing else: which blocks, in which layout, is decided by the
descriptor, so the GPU transports (CUDA IPC, NCCL) implement the same classes. Their pages travel
out of band, and the control plane (`PushKV`, or `WriteKV` for cuda-ipc) carries small chunks saying
which pages are in place (per layer, or one for every layer), so every transport shares the receiver's
validation and the lifecycle in lifecycle.py.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from stageserve.common.errors import InvalidArgumentError, UnavailableError
from stageserve.v1 import common_pb2

_DTYPES = {
    torch.float32: common_pb2.DTYPE_FLOAT32,
    torch.float16: common_pb2.DTYPE_FLOAT16,
    torch.bfloat16: common_pb2.DTYPE_BFLOAT16,
}
_DTYPES_BY_PB = {v: k for k, v in _DTYPES.items()}


def dtype_to_pb(dtype: torch.dtype) -> int:
    return _DTYPES[dtype]


def dtype_from_pb(value: int, field: str) -> torch.dtype:
    if value not in _DTYPES_BY_PB:
        raise InvalidArgumentError(field, f"unsupported dtype {value}")
    return _DTYPES_BY_PB[value]


@dataclass(frozen=True)
class KVLayout:
    """The shape of one worker's KV pool; sender and receiver must agree on it exactly."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def page_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's pages for `num_blocks` blocks: K and V stacked first."""
        return (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block_layer(self) -> int:
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def to_pb(self) -> common_pb2.KVLayout:
        return common_pb2.KVLayout(
            num_layers=self.num_layers, block_size=self.block_size, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, dtype=dtype_to_pb(self.dtype),
        )

    @classmethod
    def from_pb(cls, pb: common_pb2.KVLayout) -> KVLayout:
        return cls(pb.num_layers, pb.block_size, pb.num_kv_heads, pb.head_dim, dtype_from_pb(pb.dtype, "layout.dtype"))


@dataclass(frozen=True)
class KVDescriptor:
    """Where a sequence's KV must go: the receiver's reservation, blocks and layout."""

    transport: str
    reservation_id: str
    block_ids: tuple[int, ...]
    layout: KVLayout
    ttl_ms: int = 0
    address: str = ""  # the receiver's gRPC address (every transport's control plane)
    cuda_ipc: common_pb2.CudaIpcTransportParams | None = None  # validated by cuda_ipc.IpcPool.from_pb
    nccl: common_pb2.NcclTransportParams | None = None

    def to_pb(self) -> common_pb2.KVTransferDescriptor:
        pb = common_pb2.KVTransferDescriptor(
            transport=self.transport, reservation_id=self.reservation_id, layout=self.layout.to_pb(),
            block_ids=list(self.block_ids), ttl_ms=self.ttl_ms,
        )
        if self.cuda_ipc is not None:
            pb.cuda_ipc.CopyFrom(self.cuda_ipc)
        elif self.nccl is not None:
            pb.nccl.CopyFrom(self.nccl)
        else:
            pb.host.address = self.address
        return pb

    @classmethod
    def from_pb(cls, pb: common_pb2.KVTransferDescriptor) -> KVDescriptor:
        if not pb.reservation_id:
            raise InvalidArgumentError("kv.reservation_id", "must not be empty")
        if not pb.block_ids:
            raise InvalidArgumentError("kv.block_ids", "must not be empty")
        return cls(
            transport=pb.transport, reservation_id=pb.reservation_id, block_ids=tuple(pb.block_ids),
            layout=KVLayout.from_pb(pb.layout), ttl_ms=pb.ttl_ms, address=pb.host.address,
            cuda_ipc=pb.cuda_ipc if pb.HasField("cuda_ipc") else None, nccl=pb.nccl if pb.HasField("nccl") else None,
        )


@dataclass
class TransferStats:
    transport: str
    num_bytes: int = 0
    num_chunks: int = 0
    num_layers: int = 0
    num_blocks: int = 0
    seconds: float = 0.0
    checksum: bool = False
    device_seconds: float = 0.0  # GPU time of the copies alone (cuda-ipc on one GPU), the data plane's share
    checksum_seconds: float = 0.0  # sender's device checksum (cuda-ipc), apart from the copies
    claim_seconds: float = 0.0  # the claim's round trip (cuda-ipc), before any copy may start


# Reads one layer's pages, `[2, len(block_ids), block_size, kv_heads, head_dim]`, from the sender's pool.
PageReader = Callable[[int, list[int]], Awaitable[torch.Tensor]]


class LayerFeed:
    """One prompt's layers as the engine computes them, for a push that overlaps the prefill.

    The engine thread calls `on_layer(layer, block_ids)` right after queueing layer `layer` of the step
    that completes the prompt (see LLMEngine.watch_layers); on a GPU it records an event on the compute
    stream there, and a sender's copy of that layer waits on the event instead of on the whole step.
    """

    def __init__(self, device: torch.device):
        self.loop = asyncio.get_running_loop()
        self.device = device
        self._layers: dict[int, asyncio.Future] = {}  # layer -> the CUDA event after it (None on CPU)
        self._block_ids: asyncio.Future = self.loop.create_future()

    def on_layer(self, layer: int, block_ids: list[int]) -> None:  # the engine thread
        event = torch.cuda.current_stream(self.device).record_event() if self.device.type == "cuda" else None
        self.loop.call_soon_threadsafe(self._land, layer, list(block_ids), event)

    def _land(self, layer: int, block_ids: list[int], event) -> None:
        if not self._block_ids.done():
            self._block_ids.set_result(block_ids)
        future = self._future(layer)
        if not future.done():
            future.set_result(event)

    def _future(self, layer: int) -> asyncio.Future:
        return self._layers.setdefault(layer, self.loop.create_future())

    async def block_ids(self) -> list[int]:
        """The prompt's blocks, in token order, once its last step has started (layer 0 is done)."""
        return await self._block_ids

    async def ready(self, layer: int):
        """Wait until `layer` is queued; returns the CUDA event to wait on (None on CPU, where it is done)."""
        return await self._future(layer)


@dataclass(frozen=True)
class KVSource:
    """The sender's pool: `read_layer` for byte transports, `pool` itself for device-to-device copies."""

    read_layer: PageReader
    pool: torch.Tensor | None = None  # [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]
    device_checksum: bool = False  # attach transport/checksum.py's page checksum to every chunk
    feed: LayerFeed | None = None  # set: layers are still being computed; wait for each before reading it

    async def layer_ready(self, layer: int) -> None:
        """Block (without blocking the loop) until `layer` may be read on the current stream."""
        if self.feed is not None:
            event = await self.feed.ready(layer)
            if event is not None:
                torch.cuda.current_stream(self.pool.device).wait_event(event)


def indexed(device: torch.device) -> torch.device:
    """`cuda` as `cuda:N` (the current GPU): streams, set_device and comparisons need the index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class TransportUnusable(UnavailableError):
    """The transport cannot reach this receiver at all (nothing was written): the caller may use host."""


class KVSender(abc.ABC):
    """The prefill side of a transport."""

    name: str

    @abc.abstractmethod
    async def send(
        self, descriptor: KVDescriptor, src_block_ids: list[int], source: KVSource, timeout_s: float
    ) -> TransferStats:
        """Copy pages `src_block_ids` (sender's pool) into `descriptor.block_ids` (receiver's), every layer."""
