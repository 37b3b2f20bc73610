"""Prefill and decode as real gRPC servers on port 0, moving KV over the host transport."""

from __future__ import annotations

import asyncio
import zlib

import grpc
import pytest

from stageserve.common.convert import sampling_params_to_pb
from stageserve.common.server import ServerConfig
from stageserve.decode.service import DecodeServiceConfig
from stageserve.decode.service import start as start_decode
from stageserve.engine.worker import EngineWorker
from stageserve.prefill.service import PrefillServiceConfig
from stageserve.prefill.service import start as start_prefill
from stageserve.sample.params import SamplingParams
from stageserve.transport.host import HostKVSender
from stageserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(make_engine):
    """A prefill engine, a decode engine and a reference engine, all on the shared weights."""
    return make_engine(num_blocks=128), make_engine(num_blocks=128), make_engine(num_blocks=128)


class Split:
    """Both servers and stubs, inside one event loop."""

    async def __aenter__(self):
        return self

    async def start(self, prefill_engine, decode_engine, prefill_overrides=None, **decode_overrides):
        server = ServerConfig(host="127.0.0.1", port=0)
        self.decode_worker = EngineWorker(decode_engine)
        self.decode_worker.start()
        self.prefill_worker = EngineWorker(prefill_engine)
        self.prefill_worker.start()
        self.decode_handle, _ = await start_decode(DecodeServiceConfig(server=server, **decode_overrides), self.decode_worker)
        prefill_config = PrefillServiceConfig(server=server, **(prefill_overrides or {}))
        self.prefill_handle, _ = await start_prefill(prefill_config, self.prefill_worker)
        self.decode_channel = grpc.aio.insecure_channel(self.decode_handle.address)
        self.prefill_channel = grpc.aio.insecure_channel(self.prefill_handle.address)
        self.decode = decode_pb2_grpc.DecodeStub(self.decode_channel)
        self.prefill = prefill_pb2_grpc.PrefillStub(self.prefill_channel)
        return self

    async def __aexit__(self, *exc):
        await self.decode_channel.close()
        await self.prefill_channel.close()
        for handle in (self.prefill_handle, self.decode_handle):
            await handle.stop(0)
        await self.prefill_worker.stop()
        await self.decode_worker.stop()

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams, cancel_after: int | None = None):
        pb_params = sampling_params_to_pb(params)
        reserved = await self.decode.Reserve(
            decode_pb2.ReserveRequest(request_id=request_id, num_tokens=len(prompt), sampling_params=pb_params)
        )
        first = await self.prefill.Prefill(
            prefill_pb2.PrefillRequest(
                request_id=request_id, prompt_token_ids=prompt, sampling_params=pb_params,
                decode_target=prefill_pb2.DecodeTarget(address=self.decode_handle.address, kv=reserved.descriptor),
            )
        )
        tokens = [first.first_token.token_id]
        call = self.decode.Attach(
            decode_pb2.AttachRequest(
                request_id=request_id, reservation_id=reserved.descriptor.reservation_id, first_token=first.first_token,
                prompt_token_ids=prompt, sampling_params=pb_params,
            )
        )
        async for event in call:
            tokens += [t.token_id for t in event.tokens]
            if cancel_after is not None and len(tokens) >= cancel_after:
                call.cancel()
                break
        return tokens

    async def leases(self) -> tuple[int, int]:
        p = await self.prefill.Stats(prefill_pb2.PrefillStatsRequest())
        d = await self.decode.Stats(decode_pb2.DecodeStatsRequest())
        return p.pool.active_leases, d.pool.active_reservations

    async def free_blocks(self) -> tuple[int, int]:
        p = await self.prefill.Stats(prefill_pb2.PrefillStatsRequest())
        d = await self.decode.Stats(decode_pb2.DecodeStatsRequest())
        return p.pool.free_blocks, d.pool.free_blocks


def run(coro):
    return asyncio.run(coro)


def test_split_generation_equals_in_process_engine(engines, tokenizer):
    prefill_engine, decode_engine, reference = engines
    prompts = [tokenizer.encode(t) for t in ("The three laws of motion are", "def add(a, b):", "Paris is")]
    expected = [r.output_token_ids for r in reference.generate(prompts, GREEDY)]

    async def main():
        async with Split() as split:
            await split.start(prefill_engine, decode_engine)
            results = await asyncio.gather(*(split.generate(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)))
            return results, await split.free_blocks()

    results, free = run(main())
    assert results == expected
    assert free == (128, 128)


@pytest.mark.slow
@pytest.mark.parametrize(
    "prefill_options",
    [{"kv_layer_push": True}, {"kv_layer_push": True, "first_token_before_kv": False, "kv_device_checksum": True}],
    ids=["layer-push", "layer-push-in-response-path-with-checksum"],
)
def test_every_push_mode_gives_the_in_process_tokens_and_leaves_nothing_open(engines, tokenizer, prefill_options):
    prefill_engine, decode_engine, reference = engines
    prompts = [tokenizer.encode(t) for t in ("Once upon a time in a quiet village,", "import numpy as np")]
    expected = [r.output_token_ids for r in reference.generate(prompts, GREEDY)]

    async def main():
        async with Split() as split:
            await split.start(prefill_engine, decode_engine, prefill_options)
            results = await asyncio.gather(*(split.generate(f"m{i}", p, GREEDY) for i, p in enumerate(prompts)))
            return results, await split.free_blocks(), await split.leases()

    results, free, leases = run(main())
    assert results == expected
    assert free == (128, 128) and leases == (0, 0)


def test_cancel_mid_stream_frees_blocks_on_both_sides(engines, tokenizer):
    prefill_engine, decode_engine, _ = engines
    prompt = tokenizer.encode("Write a long story about a dragon who learns to fly over the mountains.")

    async def main():
        async with Split() as split:
            await split.start(prefill_engine, decode_engine)
            start = await split.free_blocks()
            tokens = await split.generate("c", prompt, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True), cancel_after=3)
            for _ in range(50):  # the abort lands within one engine step
                if await split.free_blocks() == start:
                    break
                await asyncio.sleep(0.05)
            return tokens, start, await split.free_blocks()

    tokens, start, end = run(main())
    assert len(tokens) >= 3
    assert end == start == (128, 128)


@pytest.mark.parametrize("corrupt", ["dtype", "shape", "block_id", "checksum", "layer", "bytes"])
def test_malformed_kv_chunk_is_rejected_and_decode_keeps_serving(engines, tokenizer, corrupt):
    prefill_engine, decode_engine, _ = engines
    prompt = tokenizer.encode("Hello there, general")

    async def main():
        async with Split() as split:
            await split.start(prefill_engine, decode_engine)
            reserved = await split.decode.Reserve(decode_pb2.ReserveRequest(request_id="m", num_tokens=len(prompt)))
            d = reserved.descriptor
            n = len(d.block_ids)
            layout = d.layout
            shape = [2, n, layout.block_size, layout.num_kv_heads, layout.head_dim]
            data = bytes(4 * 2 * n * layout.block_size * layout.num_kv_heads * layout.head_dim)
            chunk = common_pb2.KVChunk(
                reservation_id=d.reservation_id, layer_index=0, block_ids=d.block_ids, dtype=layout.dtype,
                shape=shape, data=data, crc32=zlib.crc32(data), chunk_index=0,
            )
            if corrupt == "dtype":
                chunk.dtype = common_pb2.DTYPE_BFLOAT16
            elif corrupt == "shape":
                chunk.shape[2] += 1
            elif corrupt == "block_id":
                chunk.block_ids[0] = 10**6
            elif corrupt == "checksum":
                chunk.crc32 ^= 1
            elif corrupt == "layer":
                chunk.layer_index = 999
            elif corrupt == "bytes":
                chunk.data = data[:-4]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await split.decode.PushKV(iter([chunk]))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "kv_chunk." in err.value.details()
            await split.decode.Cancel(decode_pb2.DecodeCancelRequest(request_id="m"))
            tokens = await split.generate("after", prompt, GREEDY)
            return tokens, await split.free_blocks()

    tokens, free = run(main())
    assert len(tokens) == GREEDY.max_tokens
    assert free == (128, 128)


def test_unattached_reservation_expires(engines):
    prefill_engine, decode_engine, _ = engines

    async def main():
        async with Split() as split:
            await split.start(prefill_engine, decode_engine, reservation_ttl_s=0.2)
            await split.decode.Reserve(decode_pb2.ReserveRequest(request_id="x", num_tokens=40))
            assert (await split.free_blocks())[1] < 128
            for _ in range(40):
                await asyncio.sleep(0.1)
                if (await split.free_blocks())[1] == 128:
                    return True
            return False

    assert run(main())


def test_attach_waits_for_kv_then_times_out_if_it_never_lands(engines):
    prefill_engine, decode_engine, _ = engines

    async def main():
        async with Split() as split:
            await split.start(prefill_engine, decode_engine, kv_wait_timeout_s=0.3)
            reserved = await split.decode.Reserve(decode_pb2.ReserveRequest(request_id="early", num_tokens=5))
            call = split.decode.Attach(decode_pb2.AttachRequest(
                request_id="early", reservation_id=reserved.descriptor.reservation_id,
                first_token=common_pb2.SampledToken(token_id=1), prompt_token_ids=[1, 2, 3, 4, 5],
            ))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            await split.decode.Cancel(decode_pb2.DecodeCancelRequest(request_id="early"))
            return err.value.code(), await split.free_blocks()

    code, free = run(main())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert free == (128, 128)


def test_attach_fails_fast_after_a_corrupt_transfer(engines):
    prefill_engine, decode_engine, _ = engines

    async def main():
        async with Split() as split:
            await split.start(prefill_engine, decode_engine, kv_wait_timeout_s=30)
            reserved = await split.decode.Reserve(decode_pb2.ReserveRequest(request_id="bad", num_tokens=5))
            d = reserved.descriptor
            attach = split.decode.Attach(decode_pb2.AttachRequest(
                request_id="bad", reservation_id=d.reservation_id,
                first_token=common_pb2.SampledToken(token_id=1), prompt_token_ids=[1, 2, 3, 4, 5],
            ))
            waiter = asyncio.ensure_future(attach.read())
            await asyncio.sleep(0.1)  # Attach is now waiting for the KV
            chunk = common_pb2.KVChunk(reservation_id=d.reservation_id, layer_index=0, block_ids=d.block_ids,
                                       dtype=common_pb2.DTYPE_BFLOAT16, chunk_index=0)
            with pytest.raises(grpc.aio.AioRpcError):
                await split.decode.PushKV(iter([chunk]))
            start = asyncio.get_running_loop().time()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await waiter
            elapsed = asyncio.get_running_loop().time() - start
            await split.decode.Cancel(decode_pb2.DecodeCancelRequest(request_id="bad"))
            return err.value, elapsed, await split.free_blocks()

    err, elapsed, free = run(main())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "KV transfer failed" in err.details()
    assert elapsed < 5
    assert free == (128, 128)


def test_a_transfer_that_fails_at_the_sender_fails_attach_at_once(engines, tokenizer, monkeypatch):
    prefill_engine, decode_engine, _ = engines
    prompt = tokenizer.encode("The sender of this prompt is about to fail")

    async def broken_send(self, descriptor, src, source, timeout_s):
        raise RuntimeError("the pool could not be read")

    monkeypatch.setattr(HostKVSender, "send", broken_send)

    async def main():
        async with Split() as split:
            await split.start(prefill_engine, decode_engine, kv_wait_timeout_s=30)
            start = asyncio.get_running_loop().time()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await split.generate("s", prompt, GREEDY)
            elapsed = asyncio.get_running_loop().time() - start
            await split.decode.Cancel(decode_pb2.DecodeCancelRequest(request_id="s"))
            return err.value, elapsed, await split.free_blocks(), await split.leases()

    err, elapsed, free, leases = run(main())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the sender gave up: RuntimeError: the pool could not be read" in err.details()
    assert elapsed < 10  # not decode's 30 s wait
    assert free == (128, 128) and leases == (0, 0)


def test_write_kv_claim_cancel_and_abort_over_one_stream_free_the_blocks(engines):
    """WriteKV (cuda-ipc's one RPC per transfer) over real gRPC: a refused claim, then a claim that a
    client cancel ends while the writer holds it: the blocks stay until the writer's abort on the same
    stream, then both the blocks and the reservation are gone."""
    prefill_engine, decode_engine, _ = engines

    async def main():
        async with Split() as split:
            await split.start(prefill_engine, decode_engine)
            reserved = (await split.decode.Reserve(decode_pb2.ReserveRequest(request_id="w", num_tokens=40))).descriptor
            claim = decode_pb2.ClaimKVRequest(reservation_id=reserved.reservation_id, lease_ms=5000,
                                              block_ids=list(reserved.block_ids))
            refused = split.decode.WriteKV()
            await refused.write(decode_pb2.KVWrite(claim=decode_pb2.ClaimKVRequest(
                reservation_id=reserved.reservation_id, lease_ms=5000, block_ids=list(reserved.block_ids)[::-1])))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await refused.read()
            call = split.decode.WriteKV()
            await call.write(decode_pb2.KVWrite(claim=claim))
            claimed = await call.read()
            await split.decode.Cancel(decode_pb2.DecodeCancelRequest(request_id="w"))
            held = (await split.decode.Stats(decode_pb2.DecodeStatsRequest())).pool.transfer_blocks
            await call.write(decode_pb2.KVWrite(abort_reason="copies over, giving up"))
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            stats = (await split.decode.Stats(decode_pb2.DecodeStatsRequest())).pool
            return err.value, claimed, held, stats

    err, claimed, held, stats = run(main())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "block_ids" in err.details()
    assert claimed.WhichOneof("kind") == "claimed" and held == 3
    assert (stats.free_blocks, stats.active_reservations, stats.transfer_blocks) == (128, 0, 0)
