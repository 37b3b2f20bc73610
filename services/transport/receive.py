"""The receiver's half of every transport: put one validated chunk's pages into the pool and record it.

    host:      the pages are in `data`: validated (shape, dtype, bytes, CRC-32), then written
    cuda-ipc:  the sender wrote them and waited for the copy before sending the chunk: nothing to move
    nccl:      the chunk announces the pages: receive them on the pair's communicator, then scatter

Then, if the chunk carries a device checksum, it is recomputed over the pages as they now sit in the
pool; a mismatch raises DataLossError and the transfer fails closed.

`receive` is the whole of one PushKV stream, and where a transfer's failures end its reservation:
a bad chunk or a checksum mismatch (ABORTED, fail closed), or a sender whose stream broke (ABORTED).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from stageserve.common.errors import DataLossError, InvalidArgumentError
from stageserve.transport.base import KVLayout
from stageserve.transport.checksum import page_checksum
from stageserve.transport.host import validate_chunk
from stageserve.transport.lifecycle import Reservation, ReservationTable, TransferState
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

    async def receive(self, chunks: AsyncIterator[common_pb2.KVChunk], table: ReservationTable) -> tuple[str, int, int]:
        """Land one stream of chunks, all for one reservation; returns (reservation id, chunks, bytes)."""
        reservation, num_chunks, num_bytes = None, 0, 0
        try:
            async for chunk in chunks:
                reservation = reservation or table.get(chunk.reservation_id, "kv_chunk.reservation_id")
                if chunk.reservation_id != reservation.reservation_id:
                    raise InvalidArgumentError("kv_chunk.reservation_id", "changed within one stream")
                num_bytes += await self.land(chunk, reservation)
                num_chunks += 1
                if chunk.final and not reservation.complete:
                    raise InvalidArgumentError("kv_chunk.final", "transfer ended before every layer of every block arrived")
        except (InvalidArgumentError, DataLossError) as exc:  # fail closed: nothing of this transfer is decoded
            if reservation is not None:
                await table.end(reservation, TransferState.ABORTED, str(exc), data_loss=isinstance(exc, DataLossError))
                if reservation.writer_deadline is not None:  # a one-sided writer: its final notice says its copies are done
                    async for rest in chunks:
                        if rest.final:
                            await table.writer_done(reservation)
                            break
            raise
        except BaseException as exc:  # the sender went away mid-stream (cancelled, died, or its stream broke)
            if reservation is not None and reservation.state in (TransferState.RESERVED, TransferState.RECEIVING):
                reason = f"sender's stream broke mid-transfer ({type(exc).__name__})"
                await asyncio.shield(table.end(reservation, TransferState.ABORTED, reason, sender_lost=True))
            raise
        if reservation is not None and reservation.writer_deadline is not None:
            # Only a stream the writer finished proves its copies are done; after an error the blocks
            # wait out the claim's lease (the reaper frees them).
            await table.writer_done(reservation)
        if reservation is not None and reservation.state in (TransferState.RESERVED, TransferState.RECEIVING):
            await table.end(reservation, TransferState.ABORTED, "stream ended before every layer of every block arrived",
                            sender_lost=True)
            raise InvalidArgumentError("kv_chunk.final", reservation.error)
        return (reservation.reservation_id if reservation else ""), num_chunks, num_bytes
