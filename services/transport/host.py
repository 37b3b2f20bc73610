"""The `host` transport: KV pages as raw bytes in bounded chunks over a gRPC client stream.

This is the CPU path and the fallback for the GPU transports. Each chunk carries one layer's pages
for a run of blocks, with its dtype, shape and a CRC-32, and the receiver checks all of it against
the reservation and its own pool before a byte is written.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncIterator

import grpc
import torch

from stageserve.common.security import SecurityConfig, aio_channel
from stageserve.common import tracing
from stageserve.common.errors import InvalidArgumentError
from stageserve.transport.base import (
    KVDescriptor,
    KVLayout,
    KVSender,
    KVSource,
    TransferStats,
    dtype_from_pb,
    dtype_to_pb,
)
from stageserve.transport.checksum import page_checksum
from stageserve.transport.lifecycle import Reservation
from stageserve.v1 import common_pb2, decode_pb2_grpc

DEFAULT_MAX_CHUNK_BYTES = 1 << 20


def tensor_to_bytes(pages: torch.Tensor) -> bytes:
    pages = pages.contiguous().cpu()
    if pages.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16: ship the raw 16-bit words
        pages = pages.view(torch.int16)
    return pages.numpy().tobytes()


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw_dtype = torch.int16 if dtype in (torch.bfloat16, torch.float16) else dtype
    return torch.frombuffer(bytearray(data), dtype=raw_dtype).view(dtype).reshape(shape)


class HostKVSender(KVSender):
    name = "host"

    def __init__(
        self, channel_for: callable, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, checksum: bool = True,
        layer_push: bool = True,
    ):
        self.channel_for = channel_for  # address -> grpc.aio.Channel, shared and reused
        self.max_chunk_bytes = max_chunk_bytes
        self.checksum = checksum
        self.layer_push = layer_push  # stream each layer as it is read, or read every layer before the first byte

    async def send(self, descriptor: KVDescriptor, src_block_ids: list[int], source: KVSource, timeout_s: float):
        if len(src_block_ids) != len(descriptor.block_ids):
            raise InvalidArgumentError("kv.block_ids", f"{len(descriptor.block_ids)} blocks reserved, {len(src_block_ids)} to send")
        stats = TransferStats(self.name, num_blocks=len(src_block_ids), checksum=self.checksum)
        start = time.monotonic()
        stub = decode_pb2_grpc.DecodeStub(self.channel_for(descriptor.address))
        chunks = self._chunks(descriptor, src_block_ids, source, stats)
        response = await stub.PushKV(chunks, timeout=timeout_s, metadata=tracing.outgoing_metadata())
        stats.seconds = time.monotonic() - start
        stats.num_layers = descriptor.layout.num_layers
        if response.num_bytes != stats.num_bytes:
            raise RuntimeError(f"receiver acknowledged {response.num_bytes} bytes of {stats.num_bytes}")
        return stats

    async def _chunks(
        self, descriptor: KVDescriptor, src: list[int], source: KVSource, stats: TransferStats
    ) -> AsyncIterator[common_pb2.KVChunk]:
        layout = descriptor.layout
        per_chunk = max(1, self.max_chunk_bytes // layout.bytes_per_block_layer)
        pieces = [(i, min(i + per_chunk, len(src))) for i in range(0, len(src), per_chunk)]
        read_ahead = [] if self.layer_push else [await source.read_layer(layer, src) for layer in range(layout.num_layers)]
        for layer in range(layout.num_layers):
            # [2, n, block_size, kv_heads, head_dim]
            if self.layer_push:
                await source.layer_ready(layer)
            pages = await source.read_layer(layer, src) if self.layer_push else read_ahead[layer]
            for start, end in pieces:
                piece = pages[:, start:end]
                data = tensor_to_bytes(piece)
                last = layer == layout.num_layers - 1 and end == len(src)
                chunk = common_pb2.KVChunk(
                    reservation_id=descriptor.reservation_id, layer_index=layer,
                    block_ids=descriptor.block_ids[start:end], dtype=dtype_to_pb(layout.dtype),
                    shape=layout.page_shape(end - start), data=data, chunk_index=stats.num_chunks, final=last,
                )
                if self.checksum:
                    chunk.crc32 = zlib.crc32(data)
                if source.device_checksum:  # over the pages where they live, before they leave the device
                    chunk.page_checksum = page_checksum(piece)
                stats.num_chunks += 1
                stats.num_bytes += len(data)
                yield chunk


def validate_chunk(chunk: common_pb2.KVChunk, reservation: Reservation, layout: KVLayout) -> torch.Tensor | None:
    """Check one chunk against the reservation and the local pool; returns the pages to write, or None
    for an out-of-band chunk (a GPU transport's pages, which are not in `data`).

    Raises InvalidArgumentError naming the first bad field. Nothing is written on failure.
    """
    if reservation.state.terminal:
        raise InvalidArgumentError("kv_chunk.reservation_id", f"reservation is {reservation.state.value}")
    if chunk.chunk_index != reservation.next_chunk:
        raise InvalidArgumentError("kv_chunk.chunk_index", f"expected {reservation.next_chunk}, got {chunk.chunk_index}")
    if chunk.layer_index >= layout.num_layers:
        raise InvalidArgumentError("kv_chunk.layer_index", f"{chunk.layer_index} >= num_layers {layout.num_layers}")
    if chunk.num_layers > 1 and not chunk.out_of_band:
        raise InvalidArgumentError("kv_chunk.num_layers", "only an out-of-band chunk may cover several layers")
    if chunk.layer_index + max(chunk.num_layers, 1) > layout.num_layers:
        raise InvalidArgumentError(
            "kv_chunk.num_layers", f"layers {chunk.layer_index}+{chunk.num_layers} pass num_layers {layout.num_layers}"
        )
    ids = list(chunk.block_ids)
    if not ids or len(set(ids)) != len(ids) or not set(ids) <= set(reservation.block_ids):
        raise InvalidArgumentError("kv_chunk.block_ids", "must be distinct blocks of the reservation")
    dtype = dtype_from_pb(chunk.dtype, "kv_chunk.dtype")
    if dtype != layout.dtype:
        raise InvalidArgumentError("kv_chunk.dtype", f"{dtype} does not match the pool's {layout.dtype}")
    shape = layout.page_shape(len(ids))
    if tuple(chunk.shape) != shape:
        raise InvalidArgumentError("kv_chunk.shape", f"{tuple(chunk.shape)} != expected {shape}")
    if chunk.out_of_band:
        if reservation.transport == "host":
            raise InvalidArgumentError("kv_chunk.out_of_band", "this reservation is for the host transport: pages must be in data")
        if chunk.data or chunk.HasField("crc32"):
            raise InvalidArgumentError("kv_chunk.data", "must be empty on an out-of-band chunk")
        return None
    expected_bytes = layout.bytes_per_block_layer * len(ids)
    if len(chunk.data) != expected_bytes:
        raise InvalidArgumentError("kv_chunk.data", f"{len(chunk.data)} bytes, expected {expected_bytes}")
    if chunk.HasField("crc32") and zlib.crc32(chunk.data) != chunk.crc32:
        raise InvalidArgumentError("kv_chunk.crc32", "checksum mismatch: pages corrupted in transit")
    return tensor_from_bytes(chunk.data, dtype, shape)


def channel_cache(security: SecurityConfig | None = None) -> callable:
    """An address -> channel function that reuses one channel per address (TLS and token per `security`)."""
    channels: dict[str, grpc.aio.Channel] = {}

    def get(address: str) -> grpc.aio.Channel:
        if address not in channels:
            channels[address] = aio_channel(
                address, security, [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
            )
        return channels[address]

    return get
