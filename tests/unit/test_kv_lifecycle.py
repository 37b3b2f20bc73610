"""The KV transfer state machine (transport/lifecycle.py) against a fake transport, no gRPC.

The fake transport is the host transport's real chunk stream (HostKVSender._chunks) handed straight to
the receiver's real `KVLanding.receive`, with a hook that can stall, break or corrupt it; the pool
and its allocator are a few lines of torch.
"""

from __future__ import annotations

import asyncio
import time
import zlib

import pytest
import torch

from stageserve.common.errors import DataLossError, InvalidArgumentError, NotFoundError, UnavailableError
from stageserve.transport.base import KVDescriptor, KVLayout, KVSource
from stageserve.transport.checksum import page_checksum
from stageserve.transport.host import HostKVSender, validate_chunk
from stageserve.transport.lifecycle import LeaseState, LeaseTable, Reservation, ReservationTable, TransferState
from stageserve.transport.receive import KVLanding
from stageserve.v1 import common_pb2, decode_pb2

LAYOUT = KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
NUM_BLOCKS = 16


class FakeRunner:
    """The slice of ModelRunner a receiver uses: a pool, read_kv and write_kv."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.kv_pool = torch.randn((LAYOUT.num_layers, *LAYOUT.page_shape(NUM_BLOCKS)), generator=generator)

    def read_kv(self, layer, ids):
        return self.kv_pool[layer].index_select(1, torch.tensor(ids))

    def write_kv(self, layer, ids, pages):
        self.kv_pool[layer].index_copy_(1, torch.tensor(ids), pages)


class FakeDecode:
    """A receiver: a free list, the reservation table and the real landing code."""

    def __init__(self):
        self.runner = FakeRunner(seed=1)
        self.free_list = list(range(NUM_BLOCKS))
        self.owned: dict[str, list[int]] = {}
        self.table = ReservationTable(free=self.free)
        self.landing = KVLanding(self.runner, LAYOUT)

    async def free(self, request_id: str) -> bool:
        blocks = self.owned.pop(request_id, None)
        if blocks is not None:
            self.free_list.extend(blocks)
        return blocks is not None

    def reserve(self, request_id: str, num_blocks: int, ttl_s: float = 30.0, transport: str = "host") -> Reservation:
        blocks, self.free_list = self.free_list[:num_blocks], self.free_list[num_blocks:]
        self.owned[request_id] = blocks
        reservation = Reservation(f"res-{request_id}", request_id, tuple(blocks), LAYOUT, time.monotonic() + ttl_s, transport)
        self.table.add(reservation)
        return reservation


class FakeTransport:
    """Host-transport chunks, delivered in process; `hook(index, chunk)` may stall, raise or rewrite one."""

    def __init__(self, decode: FakeDecode, hook=None, device_checksum: bool = False):
        self.decode, self.hook = decode, hook
        self.sender = HostKVSender(channel_for=None, max_chunk_bytes=LAYOUT.bytes_per_block_layer * 2)
        self.source_runner = FakeRunner(seed=2)

        async def read_layer(layer, ids):
            return self.source_runner.read_kv(layer, ids)

        self.source = KVSource(read_layer, self.source_runner.kv_pool, device_checksum)

    async def send(self, reservation: Reservation, src: list[int]):
        descriptor = KVDescriptor("host", reservation.reservation_id, reservation.block_ids, LAYOUT)
        chunks = self.sender._chunks(descriptor, src, self.source, stats=type("S", (), {"num_chunks": 0, "num_bytes": 0})())

        async def delivered():
            index = 0
            async for chunk in chunks:
                if self.hook is not None:
                    chunk = await self.hook(index, chunk) or chunk
                index += 1
                yield chunk

        return await self.decode.landing.receive(delivered(), self.decode.table)


async def attach(table: ReservationTable, reservation: Reservation, timeout_s: float = 2.0) -> None:
    """What Decode.Attach does before the sequence joins the batch."""
    await asyncio.wait_for(reservation.settled.wait(), timeout_s)
    if reservation.state is not TransferState.LANDED:
        raise reservation.failure()
    await table.end(reservation, TransferState.ATTACHED)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_success_lands_every_page_and_attach_keeps_the_blocks():
    async def main():
        decode = FakeDecode()
        reservation = decode.reserve("ok", 5)
        transport = FakeTransport(decode)
        src = [9, 3, 0, 7, 12]
        waiter = asyncio.ensure_future(attach(decode.table, reservation))
        rid, num_chunks, num_bytes = await transport.send(reservation, src)
        await waiter
        for layer in range(LAYOUT.num_layers):
            assert torch.equal(decode.runner.read_kv(layer, list(reservation.block_ids)), transport.source_runner.read_kv(layer, src))
        return decode, reservation, rid, num_chunks, num_bytes

    decode, reservation, rid, num_chunks, num_bytes = run(main())
    assert rid == reservation.reservation_id and num_chunks == 3 * 3  # 5 blocks in chunks of 2, per layer
    assert num_bytes == 5 * LAYOUT.num_layers * LAYOUT.bytes_per_block_layer
    assert reservation.state is TransferState.ATTACHED
    assert len(decode.table) == 0 and decode.table.num_blocks == 0
    assert len(decode.free_list) == NUM_BLOCKS - 5  # attached: the running sequence owns them now


def test_client_cancel_mid_transfer_frees_at_once_and_fails_the_waiting_attach():
    async def main():
        decode = FakeDecode()
        reservation = decode.reserve("c", 4)
        stalled = asyncio.Event()

        async def stall_after_first(index, chunk):
            if index == 1:
                stalled.set()
                await asyncio.sleep(3600)

        transport = FakeTransport(decode, stall_after_first)
        send = asyncio.ensure_future(transport.send(reservation, [0, 1, 2, 3]))
        waiter = asyncio.ensure_future(attach(decode.table, reservation))
        await stalled.wait()
        assert reservation.state is TransferState.RECEIVING
        assert await decode.table.end(reservation, TransferState.RELEASED, "client cancelled")
        free_right_after = len(decode.free_list)
        with pytest.raises(InvalidArgumentError, match="client cancelled"):
            await waiter
        send.cancel()  # the sender's stream goes away too
        with pytest.raises(asyncio.CancelledError):
            await send
        return decode, reservation, free_right_after

    decode, reservation, free_right_after = run(main())
    assert free_right_after == NUM_BLOCKS
    assert reservation.state is TransferState.RELEASED
    assert len(decode.table) == 0


@pytest.mark.parametrize("fault", ["dtype", "block_outside_reservation", "crc", "short"])
def test_decode_rejecting_a_chunk_aborts_and_frees(fault):
    async def corrupt(index, chunk):
        if index != 2:
            return chunk
        if fault == "dtype":
            chunk.dtype = 3  # bfloat16
        elif fault == "block_outside_reservation":
            chunk.block_ids[0] = NUM_BLOCKS - 1
        elif fault == "crc":
            chunk.data = bytes([chunk.data[0] ^ 1]) + chunk.data[1:]
        elif fault == "short":
            chunk.final = True
        return chunk

    async def main():
        decode = FakeDecode()
        reservation = decode.reserve("r", 5)
        with pytest.raises(InvalidArgumentError, match="kv_chunk"):
            await FakeTransport(decode, corrupt).send(reservation, [0, 1, 2, 3, 4])
        with pytest.raises(InvalidArgumentError, match="KV transfer failed"):
            await attach(decode.table, reservation)
        with pytest.raises(InvalidArgumentError, match="KV transfer failed"):  # a late Attach learns the reason too
            decode.table.get(reservation.reservation_id, "reservation_id")
        return decode, reservation

    decode, reservation = run(main())
    assert reservation.state is TransferState.ABORTED and not reservation.received
    assert len(decode.free_list) == NUM_BLOCKS and len(decode.table) == 0


def test_sender_that_dies_mid_stream_aborts_the_reservation():
    async def die(index, chunk):
        if index == 4:
            raise ConnectionResetError("prefill worker died")

    async def main():
        decode = FakeDecode()
        reservation = decode.reserve("d", 5)
        with pytest.raises(ConnectionResetError):
            await FakeTransport(decode, die).send(reservation, [0, 1, 2, 3, 4])
        # UNAVAILABLE, not INVALID_ARGUMENT: the gateway may prefill again on another worker.
        with pytest.raises(UnavailableError, match="stream broke"):
            await attach(decode.table, reservation)
        return decode, reservation

    decode, reservation = run(main())
    assert reservation.state is TransferState.ABORTED
    assert len(decode.free_list) == NUM_BLOCKS


def test_reservation_past_its_ttl_expires_and_frees():
    async def main():
        decode = FakeDecode()
        old = decode.reserve("old", 3, ttl_s=0.01)
        fresh = decode.reserve("fresh", 3, ttl_s=30)
        await asyncio.sleep(0.02)
        assert await decode.table.expire() == 1
        with pytest.raises(InvalidArgumentError, match="TTL"):
            await attach(decode.table, old)
        return decode, old, fresh

    decode, old, fresh = run(main())
    assert old.state is TransferState.EXPIRED and fresh.state is TransferState.RESERVED
    assert len(decode.free_list) == NUM_BLOCKS - 3 and len(decode.table) == 1


def test_device_checksum_mismatch_fails_closed_as_data_loss():
    async def corrupt_pages(index, chunk):
        if index == 3:  # flip one value but keep the CRC valid: only the page checksum can tell
            data = bytearray(chunk.data)
            data[8] ^= 0x40
            chunk.data, chunk.crc32 = bytes(data), zlib.crc32(bytes(data))
        return chunk

    async def main():
        decode = FakeDecode()
        reservation = decode.reserve("x", 4)
        with pytest.raises(DataLossError, match="page_checksum"):
            await FakeTransport(decode, corrupt_pages, device_checksum=True).send(reservation, [0, 1, 2, 3])
        with pytest.raises(DataLossError, match="KV transfer failed"):
            await attach(decode.table, reservation)
        clean = decode.reserve("x", 4)  # prefilled again into a new reservation: this time it lands
        await FakeTransport(decode, device_checksum=True).send(clean, [0, 1, 2, 3])
        await attach(decode.table, clean)
        return reservation, clean

    reservation, clean = run(main())
    assert reservation.state is TransferState.ABORTED and reservation.data_loss
    assert clean.state is TransferState.ATTACHED


def test_claimed_reservation_keeps_its_blocks_until_the_writer_is_done_or_its_lease_ends():
    async def main():
        decode = FakeDecode()
        a, b = decode.reserve("a", 2), decode.reserve("b", 2)
        with pytest.raises(InvalidArgumentError, match="block_ids: are not this reservation's"):
            decode.table.claim(a.reservation_id, 30, list(b.block_ids))  # a descriptor aimed at b's blocks
        decode.table.claim(a.reservation_id, 30, list(a.block_ids))
        decode.table.claim(b.reservation_id, 0.01, list(b.block_ids))
        with pytest.raises(InvalidArgumentError, match="cannot be claimed"):
            decode.table.claim(a.reservation_id, 30, list(a.block_ids))
        await decode.table.end(a, TransferState.RELEASED, "client cancelled")
        await decode.table.end(b, TransferState.RELEASED, "client cancelled")
        held_while_writing = NUM_BLOCKS - len(decode.free_list)
        assert decode.table.num_blocks == 4 and len(decode.table) == 0
        await decode.table.writer_done(a)  # a's writer finished its stream
        await asyncio.sleep(0.02)
        await decode.table.expire()  # b's writer never came back: its lease ran out
        return decode, held_while_writing

    decode, held_while_writing = run(main())
    assert held_while_writing == 4
    assert len(decode.free_list) == NUM_BLOCKS and decode.table.num_blocks == 0


def test_transitions_out_of_order_are_refused():
    async def main():
        decode = FakeDecode()
        reservation = decode.reserve("t", 2)
        with pytest.raises(InvalidArgumentError, match="cannot become attached"):
            await decode.table.end(reservation, TransferState.ATTACHED)
        assert await decode.table.end(reservation, TransferState.RELEASED)
        assert not await decode.table.end(reservation, TransferState.EXPIRED)  # ends once
        with pytest.raises(NotFoundError):
            decode.table.get("nope", "reservation_id")

    run(main())


def test_lease_table_counts_open_leases_until_closed():
    leases = LeaseTable()
    a, b = leases.open("a", 3), leases.open("b", 2)
    leases.sending(a)
    with pytest.raises(InvalidArgumentError):
        leases.sending(a)
    assert (len(leases), leases.num_blocks) == (2, 5)
    leases.close(a, LeaseState.SENT)
    leases.close(b, LeaseState.ABORTED, "decode rejected the pages")
    assert (len(leases), leases.num_blocks) == (0, 0)
    assert b.error == "decode rejected the pages"


# ---- WriteKV: a one-sided writer's claim, notices and abort on one stream (cuda-ipc) ----------------


class FakeWriter:
    """One WriteKV stream into the real `KVLanding.receive_writes`; the test plays the cuda-ipc writer,
    copying pages straight into the decode pool as the GPU copy would."""

    def __init__(self, decode: FakeDecode, reservation: Reservation):
        self.decode, self.reservation = decode, reservation
        self.source = FakeRunner(seed=2).kv_pool
        self.src = list(range(len(reservation.block_ids)))
        self._queue: asyncio.Queue = asyncio.Queue()
        self.acks = decode.landing.receive_writes(self._writes(), decode.table, max_lease_s=30.0)

    async def _writes(self):
        while (item := await self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def say(self, item) -> decode_pb2.KVWriteAck | None:
        """Send one message (None: half-close; an exception: the stream breaks) and read decode's next ack."""
        self._queue.put_nowait(item)
        return await anext(self.acks, None)

    def claim(self, lease_ms: int = 30_000, block_ids=None) -> decode_pb2.KVWrite:
        ids = self.reservation.block_ids if block_ids is None else block_ids
        return decode_pb2.KVWrite(claim=decode_pb2.ClaimKVRequest(
            reservation_id=self.reservation.reservation_id, lease_ms=lease_ms, block_ids=ids))

    def copy(self, first: int = 0, last: int = LAYOUT.num_layers) -> None:
        dst = torch.tensor(self.reservation.block_ids)
        self.decode.runner.kv_pool[first:last].index_copy_(2, dst, self.source[first:last].index_select(2, torch.tensor(self.src)))

    def notice(self, first: int = 0, last: int = LAYOUT.num_layers, index: int = 0, checksum: bool = True):
        chunk = common_pb2.KVChunk(
            reservation_id=self.reservation.reservation_id, layer_index=first, num_layers=last - first,
            block_ids=self.reservation.block_ids, dtype=common_pb2.DTYPE_FLOAT32,
            shape=LAYOUT.page_shape(len(self.src)), chunk_index=index, final=last >= LAYOUT.num_layers,
            out_of_band=True,
        )
        if checksum and last <= LAYOUT.num_layers:
            chunk.page_checksum = page_checksum(self.source[first:last].index_select(2, torch.tensor(self.src)))
        return decode_pb2.KVWrite(landed=chunk)


def ipc_reservation(decode: FakeDecode, request_id: str, num_blocks: int = 3, ttl_s: float = 30.0) -> Reservation:
    return decode.reserve(request_id, num_blocks, ttl_s, transport="cuda-ipc")


def test_write_claims_then_one_notice_for_every_layer_lands_it():
    async def main():
        decode = FakeDecode()
        reservation = ipc_reservation(decode, "w")
        writer = FakeWriter(decode, reservation)
        assert (await writer.say(writer.claim())).WhichOneof("kind") == "claimed"
        assert reservation.state is TransferState.RECEIVING and reservation.writer_deadline is not None
        writer.copy()
        done = await writer.say(writer.notice())
        assert done.done.num_chunks == 1 and done.done.num_bytes == 3 * 3 * LAYOUT.bytes_per_block_layer
        assert await anext(writer.acks, None) is None  # the stream ends after `done`
        await attach(decode.table, reservation)
        return decode, reservation

    decode, reservation = run(main())
    assert reservation.state is TransferState.ATTACHED and reservation.writer_deadline is None
    assert decode.table.num_blocks == 0


def test_write_refused_claims_leave_the_reservation_untouched():
    async def main():
        decode = FakeDecode()
        reservation, other = ipc_reservation(decode, "r"), ipc_reservation(decode, "o")
        with pytest.raises(InvalidArgumentError, match="block_ids"):  # aimed at another sequence's blocks
            await FakeWriter(decode, reservation).say(FakeWriter(decode, reservation).claim(block_ids=other.block_ids))
        with pytest.raises(InvalidArgumentError, match="lease_ms"):
            await FakeWriter(decode, reservation).say(FakeWriter(decode, reservation).claim(lease_ms=60_000))
        writer = FakeWriter(decode, reservation)
        with pytest.raises(InvalidArgumentError, match="must claim"):  # a notice before any claim
            await writer.say(writer.notice())
        return reservation

    reservation = run(main())
    assert reservation.state is TransferState.RESERVED and reservation.writer_deadline is None


def test_write_cancelled_by_the_client_keeps_the_blocks_until_the_writers_last_notice():
    async def main():
        decode = FakeDecode()
        reservation = ipc_reservation(decode, "c")
        writer = FakeWriter(decode, reservation)
        await writer.say(writer.claim())
        await decode.table.end(reservation, TransferState.RELEASED, "client cancelled")  # mid-copy
        held_while_copying = NUM_BLOCKS - len(decode.free_list)
        writer.copy()
        with pytest.raises(InvalidArgumentError, match="released"):
            await writer.say(writer.notice())
        return decode, held_while_copying

    decode, held_while_copying = run(main())
    assert held_while_copying == 3
    assert len(decode.free_list) == NUM_BLOCKS and decode.table.num_blocks == 0


def test_write_abort_from_the_writer_frees_at_once_and_fails_the_attach():
    async def main():
        decode = FakeDecode()
        reservation = ipc_reservation(decode, "a")
        writer = FakeWriter(decode, reservation)
        await writer.say(writer.claim())
        assert await writer.say(decode_pb2.KVWrite(abort_reason="prefill cancelled")) is None
        with pytest.raises(UnavailableError, match="gave up: prefill cancelled"):
            await attach(decode.table, reservation)
        return decode, reservation

    decode, reservation = run(main())
    assert reservation.state is TransferState.ABORTED
    assert len(decode.free_list) == NUM_BLOCKS and decode.table.num_blocks == 0


def test_write_from_a_writer_that_died_holds_the_blocks_until_its_lease_ends():
    async def main():
        decode = FakeDecode()
        reservation = ipc_reservation(decode, "d")
        writer = FakeWriter(decode, reservation)
        await writer.say(writer.claim(lease_ms=10))
        with pytest.raises(ConnectionResetError):
            await writer.say(ConnectionResetError("prefill worker died"))
        held = NUM_BLOCKS - len(decode.free_list)  # its copies may still be running on the GPU
        await asyncio.sleep(0.02)
        await decode.table.expire()
        with pytest.raises(UnavailableError, match="stream broke"):
            await attach(decode.table, reservation)
        return decode, held

    decode, held = run(main())
    assert held == 3 and len(decode.free_list) == NUM_BLOCKS


@pytest.mark.parametrize("fault", ["layers_past_the_pool", "checksum", "half_close"])
def test_write_with_a_bad_final_notice_fails_closed_and_frees_at_once(fault):
    async def main():
        decode = FakeDecode()
        reservation = ipc_reservation(decode, "b")
        writer = FakeWriter(decode, reservation)
        await writer.say(writer.claim())
        writer.copy()
        if fault == "layers_past_the_pool":
            bad, error = writer.notice(1, LAYOUT.num_layers + 1), (InvalidArgumentError, "num_layers")
        elif fault == "checksum":
            decode.runner.kv_pool[1, 0, reservation.block_ids[0], 0, 0, 0] += 1  # one value corrupted
            bad, error = writer.notice(), (DataLossError, "page_checksum")
        else:
            bad, error = None, (InvalidArgumentError, "before every layer")
        with pytest.raises(error[0], match=error[1]):
            await writer.say(bad)
        return decode, reservation

    decode, reservation = run(main())
    assert reservation.state is TransferState.ABORTED and not reservation.received
    assert len(decode.free_list) == NUM_BLOCKS and decode.table.num_blocks == 0


def test_write_layer_by_layer_rejected_midway_waits_for_the_writers_final_notice():
    async def main():
        decode = FakeDecode()
        reservation = ipc_reservation(decode, "l")
        writer = FakeWriter(decode, reservation)
        await writer.say(writer.claim())
        writer.copy(0, 1)
        writer._queue.put_nowait(writer.notice(0, 1, 0))
        writer._queue.put_nowait(writer.notice(1, 2, index=5))  # out of order: rejected
        writer._queue.put_nowait(writer.notice(2, 3, index=2))  # layer 2's copy: the writer's last word
        with pytest.raises(InvalidArgumentError, match="chunk_index"):
            await anext(writer.acks)
        return decode

    decode = run(main())
    assert len(decode.free_list) == NUM_BLOCKS and decode.table.num_blocks == 0


def test_only_out_of_band_chunks_may_cover_several_layers():
    reservation = Reservation("r", "q", (0, 1), LAYOUT, time.monotonic() + 30, transport="cuda-ipc")
    chunk = common_pb2.KVChunk(reservation_id="r", layer_index=0, num_layers=2, block_ids=[0, 1],
                               dtype=common_pb2.DTYPE_FLOAT32, shape=LAYOUT.page_shape(2), data=b"\0" * 8)
    with pytest.raises(InvalidArgumentError, match="num_layers"):
        validate_chunk(chunk, reservation, LAYOUT)
