"""The receiver's half of every transport: put one validated chunk's pages into the pool and record it.

    host:      the pages are in `data`: validated (shape, dtype, bytes, CRC-32), then written
    cuda-ipc:  the sender wrote them and waited for the copy before sending the chunk: nothing to move
    nccl:      the chunk announces the pages: receive them on the pair's communicator, then scatter

Then, if the chunk carries a device checksum, it is recomputed over the pages as they now sit in the
pool; a mismatch raises DataLossError and the transfer fails closed.
"""

from __future__ import annotations

from stageserve.common.errors import DataLossError
from stageserve.transport.base import KVLayout
from stageserve.transport.checksum import page_checksum
from stageserve.transport.host import validate_chunk
from stageserve.transport.lifecycle import Reservation
from stageserve.v1 import common_pb2


class KVLanding:
    def __init__(self, runner, layout: KVLayout, nccl=None, nccl_timeout_s: float = 30.0):
        self.runner = runner  # the engine's ModelRunner: read_kv / write_kv / kv_pool
        self.layout = layout
        self.nccl = nccl  # nccl.NcclEndpoint when that transport is served
        self.nccl_timeout_s = nccl_timeout_s

    async def land(self, chunk: common_pb2.KVChunk, reservation: Reservation) -> int:
        """Returns the bytes the chunk brought. Raises InvalidArgumentError / DataLossError; the caller aborts."""
        pages = validate_chunk(chunk, reservation, self.layout)
        ids, layer = list(chunk.block_ids), chunk.layer_index
        # Reserved blocks belong to no running sequence, so writing them off the engine thread is safe.
        if pages is not None:
            self.runner.write_kv(layer, ids, pages)
        elif reservation.transport == "nccl":
            if self.nccl is None:
                raise DataLossError("kv_chunk.comm_id: this worker serves no nccl transport")
            await self.nccl.receive(chunk, self.layout, self.runner.kv_pool, self.nccl_timeout_s)
        if chunk.HasField("page_checksum"):
            landed = page_checksum(self.runner.read_kv(layer, ids))
            if landed != chunk.page_checksum:
                raise DataLossError(
                    f"kv_chunk.page_checksum: layer {layer} pages landed with checksum {landed:#x}, "
                    f"the sender computed {chunk.page_checksum:#x}"
                )
        reservation.record(layer, ids)
        reservation.next_chunk += 1
        return self.layout.bytes_per_block_layer * len(ids)
