"""The receiver's half of every transport: put one validated chunk's pages into the pool and record it.

    host:      the pages are in `data`: validated (shape, dtype, bytes, CRC-32), then written
    cuda-ipc:  the sender wrote them and waited for the copy before sending the chunk: nothing to move
    nccl:      the chunk announces the pages: receive them on the pair's communicator, then scatter

Then, if the chunk carries a device checksum, it is recomputed over the pages as they now sit in the
pool; a mismatch raises DataLossError and the transfer fails closed.

`receive` is the whole of one PushKV stream, and where a transfer's failures end its reservation:
a bad chunk or a checksum mismatch (ABORTED, fail closed), or a sender whose stream broke (ABORTED).
`receive_writes` is the same for one WriteKV stream (cuda-ipc), which also carries the writer's claim
before it and, instead of notices, its abort: one RPC per transfer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import torch

from stageserve.common.errors import DataLossError, InvalidArgumentError
from stageserve.transport.base import KVLayout
from stageserve.transport.checksum import page_checksum
from stageserve.transport.host import validate_chunk
from stageserve.transport.lifecycle import Reservation, ReservationTable, TransferState
from stageserve.v1 import common_pb2, decode_pb2


class KVLanding:
    def __init__(self, runner, layout: KVLayout, nccl=None, nccl_timeout_s: float = 30.0):
        self.runner = runner  # the engine's ModelRunner: read_kv / write_kv / kv_pool
        self.layout = layout
        self.nccl = nccl  # nccl.NcclEndpoint when that transport is served
        self.nccl_timeout_s = nccl_timeout_s

    async def land(self, chunk: common_pb2.KVChunk, reservation: Reservation) -> int:
        """Returns the bytes the chunk brought. Raises InvalidArgumentError / DataLossError; the caller aborts."""
        pages = validate_chunk(chunk, reservation, self.layout)
        ids, layers = list(chunk.block_ids), range(chunk.layer_index, chunk.layer_index + max(chunk.num_layers, 1))
        layer = chunk.layer_index
        # Reserved blocks belong to no running sequence, so writing them off the engine thread is safe.
        if pages is not None:
            self.runner.write_kv(layer, ids, pages)
        elif reservation.transport == "nccl":
            if self.nccl is None:
                raise DataLossError("kv_chunk.comm_id: this worker serves no nccl transport")
            await self.nccl.receive(chunk, self.layout, self.runner.kv_pool, self.nccl_timeout_s)
        if chunk.HasField("page_checksum"):
            # The layers' pages in layer order, one gather: the same words, in the same order, as the sender's.
            pool = self.runner.kv_pool  # [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]
            landed = page_checksum(pool[layers.start : layers.stop].index_select(2, torch.tensor(ids, device=pool.device)))
            if landed != chunk.page_checksum:
                raise DataLossError(
                    f"kv_chunk.page_checksum: layers {layers.start}-{layers.stop - 1} pages landed with checksum "
                    f"{landed:#x}, the sender computed {chunk.page_checksum:#x}"
                )
        for i in layers:
            reservation.record(i, ids)
        reservation.next_chunk += 1
        return self.layout.bytes_per_block_layer * len(ids) * len(layers)

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

    async def receive_writes(
        self, writes: AsyncIterator[decode_pb2.KVWrite], table: ReservationTable, max_lease_s: float
    ) -> AsyncIterator[decode_pb2.KVWriteAck]:
        """The whole of one WriteKV stream (cuda-ipc): claim, then notices or an abort; yields the two acks.

        The writer copies only after `claimed`, and writes its notices only after the copies they name
        are over, so a clean half-close, an abort or a final notice each prove that nothing more will land
        in the blocks (`writer_done`); a stream that broke proves nothing, so the blocks then wait out the
        claim's lease.
        """
        first = await anext(aiter(writes), None)
        if first is None:
            return
        if first.WhichOneof("kind") != "claim":
            raise InvalidArgumentError("kv_write.claim", "the first message of a WriteKV stream must claim")
        claim = first.claim
        if claim.lease_ms > max_lease_s * 1000:
            raise InvalidArgumentError("kv_write.claim.lease_ms", f"longer than the reservation TTL ({max_lease_s:g} s)")
        reservation = table.claim(claim.reservation_id, max(claim.lease_ms, 1) / 1000, list(claim.block_ids))
        num_chunks = num_bytes = 0
        try:
            yield decode_pb2.KVWriteAck(claimed=decode_pb2.ClaimKVResponse(reservation_id=reservation.reservation_id))
            async for write in writes:
                kind = write.WhichOneof("kind")
                if kind == "abort_reason":
                    reason = f"the sender gave up: {write.abort_reason[:500] or 'no reason given'}"
                    await table.end(reservation, TransferState.ABORTED, reason, sender_lost=True)
                    await table.writer_done(reservation)
                    return
                if kind != "landed" or not write.landed.out_of_band:
                    raise InvalidArgumentError("kv_write.landed", "after the claim, only out-of-band notices or an abort")
                chunk = write.landed
                if chunk.reservation_id != reservation.reservation_id:
                    raise InvalidArgumentError("kv_chunk.reservation_id", "is not the claimed reservation")
                try:
                    num_bytes += await self.land(chunk, reservation)
                    if chunk.final and not reservation.complete:
                        raise InvalidArgumentError("kv_chunk.final", "transfer ended before every layer of every block arrived")
                except (InvalidArgumentError, DataLossError) as exc:  # fail closed
                    await table.end(reservation, TransferState.ABORTED, str(exc), data_loss=isinstance(exc, DataLossError))
                    if not chunk.final:  # later layers' copies may still run: wait for the writer's last word
                        async for rest in writes:
                            if rest.WhichOneof("kind") == "abort_reason" or rest.landed.final:
                                break
                    await table.writer_done(reservation)
                    raise
                num_chunks += 1
                if chunk.final:
                    await table.writer_done(reservation)
                    yield decode_pb2.KVWriteAck(done=decode_pb2.PushKVResponse(
                        reservation_id=reservation.reservation_id, num_chunks=num_chunks, num_bytes=num_bytes))
                    return
        except (InvalidArgumentError, DataLossError):
            raise
        except BaseException as exc:  # the writer's stream broke: its copies may still be running (lease)
            if not reservation.state.terminal:
                reason = f"sender's stream broke mid-transfer ({type(exc).__name__})"
                await asyncio.shield(table.end(reservation, TransferState.ABORTED, reason, sender_lost=True))
            raise
        # Half-closed without a final notice: the writer is done writing but did not finish the transfer.
        await table.end(reservation, TransferState.ABORTED, "stream ended before every layer of every block arrived",
                        sender_lost=True)
        await table.writer_done(reservation)
        raise InvalidArgumentError("kv_chunk.final", reservation.error)
