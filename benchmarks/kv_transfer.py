"""Issue 5 benchmark: moving KV pages from prefill to decode, by transport, in separate processes.

    python benchmarks/kv_transfer.py --out DIR              # one GPU, about 3 minutes on an H200
    python benchmarks/kv_transfer.py --out DIR --parts a,b  # bandwidth and TTFT only
    python benchmarks/kv_transfer.py --out DIR --two-gpus   # decode on cuda:1 (peer IPC, NCCL across GPUs)
    python benchmarks/kv_transfer.py --out DIR --smoke      # CPU, tiny shapes, host transport only

(c) runs first, because it checks correctness:
(c) parity and cleanup: dummy:smollm2-135m, prefill and decode as separate processes over cuda-ipc (host
    on CPU). Greedy outputs must equal the colocated in-process engine's. Then 200 requests with random
    cancel points (after Reserve, during Prefill, after the first token, mid-decode, or none), after which
    both pools must be clean: every block free and no reservation or lease open (the Stats RPCs).
(a) bandwidth: the KV of 1k- and 8k-token prompts of dummy:llama-3-8b (128 MiB and 1 GiB), sent by this
    process from a pool of that layout into a decode process's reservation, per transport and per push
    mode. Each transport is first checked with the device checksum on (not timed), then timed with the
    checksum off and on: end to end, the copies' GPU window, the sender's checksum and the control plane
    (the rest: the WriteKV claim round trip, notices, the final ack). Baselines in the same run: a raw
    device copy of the same bytes; the block copy kernel in one process and into decode's pool mapped over
    IPC, each back to back (steady state), alone on an idle GPU with the launch inside the timing window
    (as a transfer's copy is timed) and alone with the launch hidden (gated); raw NCCL send/recv between
    two processes (on one GPU NCCL may refuse two ranks on one device; the error is reported).
(b) idle-server TTFT breakdown for dummy:llama-3-8b: Reserve (the queue and routing hop), prefill compute,
    transfer, first decode step, for layer-by-layer and whole-request push (two prefill processes),
    against the colocated engine in this process.
Prints a table per part and writes DIR/kv_transfer.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc
import torch

from stageserve.cluster.supervisor import Cluster, ServiceSpec
from stageserve.common.convert import sampling_params_to_pb
from stageserve.engine.config import EngineConfig
from stageserve.engine.factory import create_engine
from stageserve.sample.params import SamplingParams
from stageserve.transport.base import KVDescriptor, KVLayout, KVSource
from stageserve.transport.host import HostKVSender, channel_cache
from stageserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

BLOCK = 16
ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def launch(specs: list[ServiceSpec], log: Path) -> Cluster:
    cluster = Cluster(specs, output=log.open("a"), startup_timeout_s=240)
    cluster.start()
    cluster.wait_ready()
    return cluster


def engine_args(model: str, blocks: int, device: str, *extra: str) -> tuple[str, ...]:
    return ("--model", model, "--engine-num-blocks", str(blocks), "--engine-device", device, *extra)


class Stages:
    """Stubs of one prefill and one decode worker, driven as the gateway drives them."""

    def __init__(self, prefill: str, decode: str):
        self.pc, self.dc = grpc.aio.insecure_channel(prefill), grpc.aio.insecure_channel(decode)
        self.prefill, self.decode = prefill_pb2_grpc.PrefillStub(self.pc), decode_pb2_grpc.DecodeStub(self.dc)
        self.decode_address = decode

    async def reserve(self, rid: str, n: int, params: SamplingParams, transports=()):
        pb = decode_pb2.ReserveRequest(request_id=rid, num_tokens=n, sampling_params=sampling_params_to_pb(params),
                                       transports=list(transports))
        return (await self.decode.Reserve(pb)).descriptor

    def prefill_call(self, rid: str, prompt: list[int], params: SamplingParams, descriptor):
        return self.prefill.Prefill(prefill_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt, sampling_params=sampling_params_to_pb(params),
            decode_target=prefill_pb2.DecodeTarget(address=self.decode_address, kv=descriptor)))

    def attach(self, rid: str, prompt: list[int], params: SamplingParams, descriptor, first):
        return self.decode.Attach(decode_pb2.AttachRequest(
            request_id=rid, reservation_id=descriptor.reservation_id, first_token=first.first_token,
            prompt_token_ids=prompt, sampling_params=sampling_params_to_pb(params),
            num_cached_tokens=first.num_cached_tokens))

    async def cancel(self, rid: str) -> None:
        await asyncio.gather(self.decode.Cancel(decode_pb2.DecodeCancelRequest(request_id=rid), timeout=5),
                             self.prefill.Cancel(prefill_pb2.PrefillCancelRequest(request_id=rid), timeout=5))

    async def generate(self, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
        descriptor = await self.reserve(rid, len(prompt), params)
        first = await self.prefill_call(rid, prompt, params, descriptor)
        tokens = [first.first_token.token_id]
        async for event in self.attach(rid, prompt, params, descriptor, first):
            tokens += [t.token_id for t in event.tokens]
        return tokens

    async def pools(self) -> dict:
        p = (await self.prefill.Stats(prefill_pb2.PrefillStatsRequest())).pool
        d = (await self.decode.Stats(decode_pb2.DecodeStatsRequest())).pool
        return {"prefill_free": p.free_blocks, "prefill_total": p.total_blocks, "active_leases": p.active_leases,
                "decode_free": d.free_blocks, "decode_total": d.total_blocks,
                "active_reservations": d.active_reservations, "transfer_blocks": d.transfer_blocks + p.transfer_blocks}

    async def close(self):
        await self.pc.close()
        await self.dc.close()


def clean(pools: dict) -> bool:
    return (pools["prefill_free"] == pools["prefill_total"] and pools["decode_free"] == pools["decode_total"]
            and pools["active_leases"] == pools["active_reservations"] == pools["transfer_blocks"] == 0)


# ---- (c) parity and the cancellation storm ------------------------------------------------------


async def storm_one(stages: Stages, rid: str, prompt: list[int], rng: random.Random) -> str:
    params = SamplingParams(max_tokens=rng.randint(2, 48), temperature=0.8, ignore_eos=True, seed=rng.randint(0, 99))
    point = rng.choice(["after_reserve", "during_prefill", "after_first_token", "mid_decode", "none"])
    try:
        descriptor = await stages.reserve(rid, len(prompt), params)
        if point == "after_reserve":
            return point
        call = stages.prefill_call(rid, prompt, params, descriptor)
        if point == "during_prefill":
            await asyncio.sleep(rng.uniform(0, 0.02))
            call.cancel()
            return point
        first = await call
        if point == "after_first_token":
            return point
        stream, stop_after = stages.attach(rid, prompt, params, descriptor, first), rng.randint(1, 20)
        count = 0
        async for event in stream:
            count += len(event.tokens)
            if point == "mid_decode" and count >= stop_after:
                stream.cancel()
                break
        return point
    except grpc.aio.AioRpcError as exc:
        return f"error:{exc.code().name}"
    finally:  # what the gateway does on every early end; harmless after a normal finish
        await stages.cancel(rid)


async def parity_and_storm(prefill: str, decode: str, colocated, vocab: int, storm: int, seed: int) -> dict:
    stages, rng = Stages(prefill, decode), random.Random(seed)
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    longest = colocated.max_model_len - greedy.max_tokens
    prompts = [[rng.randrange(vocab) for _ in range(min(n, longest))] for n in (17, 100, 300, 1000)]
    expected = [r.output_token_ids for r in (colocated.generate([p], greedy)[0] for p in prompts)]
    got = [await stages.generate(f"parity-{i}", p, greedy) for i, p in enumerate(prompts)]
    limit = asyncio.Semaphore(32)

    async def bounded(i):
        async with limit:
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(8, 400))]
            return await storm_one(stages, f"storm-{i}", prompt, rng)

    start = time.monotonic()
    outcomes = await asyncio.gather(*(bounded(i) for i in range(storm)))
    storm_s = time.monotonic() - start
    for _ in range(200):  # cancels land within a step; cuda-ipc claims cut short wait out their lease (5 s)
        pools = await stages.pools()
        if clean(pools):
            break
        await asyncio.sleep(0.05)
    settle_s = time.monotonic() - start - storm_s
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    await stages.close()
    return {"parity": got == expected, "mismatched_prompts": [i for i, (a, b) in enumerate(zip(got, expected)) if a != b],
            "storm_requests": storm, "storm_outcomes": counts, "storm_s": storm_s, "settle_s": settle_s,
            "pools_after": pools, "pools_clean": clean(pools)}


# ---- (a) bandwidth ------------------------------------------------------------------------------


def timed_cuda(fn, reps: int) -> float:
    """Mean seconds of fn() (GPU: CUDA events after a warm-up; CPU: wall clock)."""
    fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / reps


def one_shot_cuda(fn, reps: int, gated: bool) -> float:
    """Median seconds of fn() run alone on an idle GPU, as one transfer's copy runs: CUDA events around
    it. Ungated, the window opens before the host has launched the kernel (the launch latency is in it,
    as in a transfer's `device_seconds`); gated, the stream first spins for ~1 ms so that the kernel is
    queued before the window opens, which leaves the kernel alone."""
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        time.sleep(0.002)  # idle, as between two requests
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if gated:
            torch.cuda._sleep(2_000_000)  # ~1 ms of cycles: longer than queueing begin, fn and end
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_baselines(pool, dst_pool, src_ids: list[int], dst_ids: list[int], nbytes: int, reps: int) -> dict:
    """The block copy kernel from `pool` into `dst_pool` (this process's, or decode's mapped over IPC):
    back to back (steady state), alone from idle with the launch inside the window, and alone gated."""
    from stageserve.transport.cuda_ipc import copy_blocks

    src_t, dst_t = torch.tensor(src_ids, device=pool.device), torch.tensor(dst_ids, device=pool.device)
    fn = lambda: copy_blocks(pool, dst_pool, src_t, dst_t)  # noqa: E731
    out = {"back_to_back_gb_s": nbytes / timed_cuda(fn, reps) / 1e9}
    if pool.is_cuda:
        out["one_shot_gb_s"] = nbytes / one_shot_cuda(fn, reps, gated=False) / 1e9
        out["one_shot_gated_gb_s"] = nbytes / one_shot_cuda(fn, reps, gated=True) / 1e9
    return out


def raw_nccl(device: torch.device, peer_device: str, nbytes: int, iters: int) -> dict:
    """Raw NCCL send/recv of `nbytes` between this process and a child on `peer_device`."""
    from stageserve.transport.nccl import NcclLibrary

    try:
        nccl = NcclLibrary()
        uid = nccl.unique_id()
    except Exception as exc:  # no libnccl
        return {"error": str(exc)}
    child = subprocess.Popen([sys.executable, __file__, "--nccl-peer", uid.hex(), "--peer-device", peer_device,
                              "--peer-bytes", str(nbytes), "--peer-iters", str(iters + 1)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import concurrent.futures

        pool = concurrent.futures.ThreadPoolExecutor(1)  # not joined: an init that hangs is left behind (os._exit)
        future = pool.submit(nccl.init_rank, uid, 0, device)
        pool.shutdown(wait=False)
        try:
            comm = future.result(timeout=10)
        except Exception as exc:
            child.kill()
            out = child.communicate(timeout=10)[0]
            return {"error": f"{type(exc).__name__}: {exc}", "peer_output": out[-2000:]}
        buffer, stream = torch.empty(nbytes, dtype=torch.uint8, device=device), torch.cuda.Stream(device)
        seconds = timed_cuda(lambda: _nccl_send(nccl, comm, buffer, stream), iters)
        child.wait(timeout=60)
        return {"gb_per_s": nbytes / seconds / 1e9, "seconds": seconds}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _nccl_send(nccl, comm, buffer, stream):
    nccl.send(comm, buffer, 1, stream)
    torch.cuda.current_stream().wait_stream(stream)


def nccl_peer(args) -> None:
    """The child of `raw_nccl`: join as rank 1 and receive `peer_iters` times."""
    from stageserve.transport.nccl import NcclLibrary

    nccl, device = NcclLibrary(), torch.device(args.peer_device)
    comm = nccl.init_rank(bytes.fromhex(args.nccl_peer), 1, device)
    buffer, stream = torch.empty(args.peer_bytes, dtype=torch.uint8, device=device), torch.cuda.Stream(device)
    for _ in range(args.peer_iters):
        nccl.recv(comm, buffer, 0, stream)
    stream.synchronize()


async def bandwidth(decode_address: str, layout: KVLayout, device: torch.device, sizes, transports, args) -> list[dict]:
    pool_blocks = max(sizes) // BLOCK + 64
    pool = torch.randn((layout.num_layers, *layout.page_shape(pool_blocks)), device=device).to(layout.dtype)

    async def read_layer(layer, ids):
        return pool[layer].index_select(1, torch.tensor(ids, device=device))

    channels = channel_cache()
    senders = {"host": {True: HostKVSender(channels, layer_push=True), False: HostKVSender(channels, layer_push=False)}}
    if "cuda-ipc" in transports:
        from stageserve.transport.cuda_ipc import CudaIpcKVSender

        senders["cuda-ipc"] = {push: CudaIpcKVSender(channels, device, layer_push=push) for push in (True, False)}
    if "nccl" in transports:
        from stageserve.transport.nccl import NcclKVSender

        nccl = NcclKVSender(channels, device, connect_timeout_s=10)
        senders["nccl"] = {True: nccl}
    stages = Stages(decode_address, decode_address)
    rows, rng, failed = [], random.Random(0), {}  # a transport that failed once (NCCL on one GPU) is not retried
    for tokens in sizes:
        blocks = -(-tokens // BLOCK)
        nbytes = blocks * layout.num_layers * layout.bytes_per_block_layer
        src_ids = rng.sample(range(pool_blocks), blocks)  # scattered, as a real prefill pool's are
        flat_a = torch.empty(nbytes, dtype=torch.uint8, device=device)
        flat_b = torch.empty_like(flat_a)
        reps = 20 if nbytes < (512 << 20) else 5
        raw = timed_cuda(lambda: flat_b.copy_(flat_a), reps)
        other = torch.empty_like(pool)
        block_copy = copy_baselines(pool, other, src_ids, list(range(blocks)), nbytes, reps)
        src_t, dst_t = torch.tensor(src_ids, device=device), torch.arange(blocks, device=device)
        dim = pool.dim() - 4
        two_pass = timed_cuda(lambda: other.index_copy_(dim, dst_t, pool.index_select(dim, src_t)), reps)
        del flat_a, flat_b, other
        row = {"tokens": tokens, "bytes": nbytes, "raw_copy_gb_s": nbytes / raw / 1e9,
               "block_copy_gb_s": block_copy["back_to_back_gb_s"], "block_copy": block_copy,
               "gather_scatter_gb_s": nbytes / two_pass / 1e9}
        for name, by_push in senders.items():
            for push, sender in by_push.items():
                key = f"{name}/{'layer' if push else 'request'}"
                if name in failed:
                    row[key] = {"error": f"not run: failed at {failed[name]}"}
                    continue
                try:
                    row[key] = await timed_transfers(stages, sender, name, key, tokens, src_ids, pool, read_layer,
                                                     decode_address, nbytes)
                except Exception as exc:  # e.g. NCCL refusing two ranks on one GPU: say so, keep going
                    row[key] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    failed[name] = f"{tokens} tokens"
        ipc = senders.get("cuda-ipc", {}).get(False)
        if ipc is not None and ipc.pools and not args.two_gpus and "cuda-ipc" not in failed:  # into decode's mapped pool
            rid = f"bw-mapped-{tokens}"
            descriptor = await stages.reserve(rid, tokens, ONE_TOKEN, transports=["cuda-ipc"])
            try:
                mapped = ipc.pools[descriptor.cuda_ipc.pool_id]
                row["block_copy_into_ipc_pool"] = copy_baselines(pool, mapped, src_ids, list(descriptor.block_ids),
                                                                 nbytes, reps)
            finally:
                await stages.decode.Cancel(decode_pb2.DecodeCancelRequest(request_id=rid))
        if device.type == "cuda" and "raw_nccl" not in failed:
            peer = "cuda:1" if args.two_gpus else str(device)
            row["raw_nccl"] = raw_nccl(device, peer, nbytes, 3 if nbytes > (512 << 20) else 10)
            if "error" in row["raw_nccl"]:
                failed["raw_nccl"] = f"{tokens} tokens"
        rows.append(row)
        print(json.dumps(row), flush=True)
    await stages.close()
    return rows


async def timed_transfers(stages, sender, name, key, tokens, src_ids, pool, read_layer, decode_address, nbytes) -> dict:
    """One checked transfer (device checksum on, not timed), then timed ones with the checksum off and,
    for the GPU transports, on. Per setting: end to end (the sender's send()), the copies' GPU window
    (cuda-ipc on one GPU), the sender's checksum, and the control plane (the rest: claim, notices, acks)."""
    runs = 1 if name == "host" and nbytes > (256 << 20) else 3
    settings = [("check", True, 1), ("off", False, runs)] + ([("on", True, runs)] if name != "host" else [])
    out = {"checked": True}
    for setting, checksum, count in settings:
        totals = {"seconds": 0.0, "device_seconds": 0.0, "checksum_seconds": 0.0, "claim_seconds": 0.0}
        for rep in range(count):
            rid = f"bw-{key}-{tokens}-{setting}-{rep}"
            try:
                descriptor = KVDescriptor.from_pb(await stages.reserve(rid, tokens, ONE_TOKEN, transports=[name]))
                descriptor = KVDescriptor(**{**descriptor.__dict__, "address": decode_address})
                source = KVSource(read_layer, pool, device_checksum=checksum)
                stats = await sender.send(descriptor, src_ids, source, timeout_s=60)
                for k in totals:
                    totals[k] += getattr(stats, k) / count
            finally:
                await stages.decode.Cancel(decode_pb2.DecodeCancelRequest(request_id=rid))
        if setting == "check":
            continue
        seconds, copy_s = totals["seconds"], totals["device_seconds"]
        result = {"gb_s": nbytes / seconds / 1e9, "ms": seconds * 1e3}
        if copy_s:
            result |= {"copy_gb_s": nbytes / copy_s / 1e9, "copy_ms": copy_s * 1e3,
                       "checksum_ms": totals["checksum_seconds"] * 1e3, "claim_ms": totals["claim_seconds"] * 1e3,
                       "control_ms": (seconds - copy_s - totals["checksum_seconds"]) * 1e3}
        out[f"checksum_{setting}"] = result
    return out | out["checksum_off"]  # the top level keeps the old keys: checksum off


# ---- (b) TTFT breakdown -------------------------------------------------------------------------


async def ttft(prefills: dict[str, str], decode_address: str, colocated, vocab: int, sizes, reps: int) -> list[dict]:
    rows, rng = [], random.Random(1)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for tokens in sizes:
        for mode, address in prefills.items():
            stages, parts = Stages(address, decode_address), []
            for rep in range(reps + 1):  # the first warms this prompt length up and is not counted
                prompt = [rng.randrange(vocab) for _ in range(tokens)]  # fresh: no prefix-cache hit
                rid = f"ttft-{mode}-{tokens}-{rep}"
                t0 = time.perf_counter()
                descriptor = await stages.reserve(rid, tokens, params)
                t1 = time.perf_counter()
                first = await stages.prefill_call(rid, prompt, params, descriptor)
                t2 = time.perf_counter()
                call = stages.attach(rid, prompt, params, descriptor, first)
                await call.read()
                t3 = time.perf_counter()
                call.cancel()
                await stages.cancel(rid)
                if rep:
                    transfer = first.kv_transfer_s
                    parts.append({"reserve_ms": (t1 - t0) * 1e3, "prefill_ms": (t2 - t1 - transfer) * 1e3,
                                  "transfer_ms": transfer * 1e3, "first_decode_step_ms": (t3 - t2) * 1e3})
            await stages.close()
            row = {"tokens": tokens, "mode": f"disaggregated/{mode}",
                   **{k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}}
            row["ttft_ms"] = row["reserve_ms"] + row["prefill_ms"]  # first_token_before_kv on: the transfer is off it
            row["ttft_with_transfer_ms"] = row["ttft_ms"] + row["transfer_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        parts = []
        for rep in range(reps + 1):
            prompt = [rng.randrange(vocab) for _ in range(tokens)]
            rid = f"colo-{tokens}-{rep}"
            t0 = time.perf_counter()
            colocated.add_request(rid, prompt, params)
            while not colocated.requests[rid].output_token_ids:
                colocated.step()
            t1 = time.perf_counter()
            while rid in colocated.requests:
                colocated.step()
            t2 = time.perf_counter()
            if rep:
                parts.append({"prefill_ms": (t1 - t0) * 1e3, "first_decode_step_ms": (t2 - t1) * 1e3})
        row = {"tokens": tokens, "mode": "colocated", **{k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}}
        row["ttft_ms"] = row["prefill_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ---- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=False, default=Path("."))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, seconds")
    parser.add_argument("--two-gpus", action="store_true", help="decode on cuda:1, prefill and this process on cuda:0")
    parser.add_argument("--parts", default="c,a,b")
    parser.add_argument("--storm", type=int, default=None, help="requests in the cancellation storm (200; 20 with --smoke)")
    parser.add_argument("--nccl-peer", help=argparse.SUPPRESS)
    parser.add_argument("--peer-device", help=argparse.SUPPRESS)
    parser.add_argument("--peer-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--peer-iters", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nccl_peer:
        return nccl_peer(args)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda:0" if gpu else "cpu")
    decode_device = "cuda:1" if args.two_gpus else str(device)
    big, small = ("dummy:llama-3-8b", "dummy:smollm2-135m") if gpu else ("dummy:tiny", "dummy:tiny")
    # TTFT prompts leave room for the two tokens generated (dummy:llama-3-8b has an 8,192-token context).
    bw_sizes, ttft_sizes = ((1024, 8191), (2048, 8190)) if gpu else ((64, 256), (64,))
    transports = ("host", "cuda-ipc", "nccl") if gpu else ("host",)
    kv = "cuda-ipc" if gpu else "host"
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "kv_transfer_services.log"
    report = {"benchmark": "kv_transfer", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine(),
              "args": {k: str(v) for k, v in vars(args).items() if not k.startswith("peer") and k != "nccl_peer"}}
    parts = args.parts.split(",")
    started = time.monotonic()
    # Graphs only up to batch 8 everywhere: the runs here are batch 1, and capture time is budget.
    engine_config = EngineConfig(device=str(device), num_blocks=1024, max_num_batched_tokens=8192 if gpu else 512,
                                 max_graph_batch_size=8)
    graphs = ("--engine-max-graph-batch-size", "8")

    if "c" in parts:
        cluster = launch([
            ServiceSpec("prefill-0", "prefill", args=engine_args(small, 1024, str(device), "--kv-transport", kv, *graphs)),
            ServiceSpec("decode-0", "decode", args=engine_args(small, 1024, decode_device, "--kv-transport", kv, *graphs)),
        ], log)
        try:
            # The services' default chunk size, so the colocated engine computes exactly what they compute.
            colocated = create_engine(small, EngineConfig(device=str(device), num_blocks=1024, max_graph_batch_size=8))
            colocated.warmup()
            result = asyncio.run(parity_and_storm(cluster.address("prefill-0"), cluster.address("decode-0"), colocated, colocated.model_config.vocab_size, args.storm or (200 if gpu else 20), 0))
            report["parity_and_storm"] = {"model": small, "transport": kv, **result}
            print(f"(c) {small} over {kv}: greedy parity {result['parity']}; {result['storm_requests']} requests with "
                  f"random cancels {result['storm_outcomes']} in {result['storm_s']:.1f} s; pools clean "
                  f"{result['pools_clean']} after {result['settle_s']:.2f} s more: {result['pools_after']}", flush=True)
            del colocated
        finally:
            cluster.stop()

    if "a" in parts or "b" in parts:
        big_args = ("--engine-max-num-batched-tokens", str(engine_config.max_num_batched_tokens))
        cluster = launch([
            ServiceSpec("decode-0", "decode", args=engine_args(big, 640, decode_device, "--kv-transport", "auto",
                                                               *graphs, *big_args)),
            ServiceSpec("prefill-0", "prefill", args=engine_args(big, 640, str(device), "--no-first-token-before-kv",
                                                                 "--no-engine-cuda-graphs", *big_args)),
            ServiceSpec("prefill-1", "prefill", args=engine_args(big, 640, str(device), "--no-first-token-before-kv",
                                                                 "--no-kv-layer-push", "--no-engine-cuda-graphs", *big_args)),
        ], log)
        try:
            if "a" in parts:
                from stageserve.engine.loader.dummy import DUMMY_SHAPES

                m = DUMMY_SHAPES[big.split(":")[1]]
                layout = KVLayout(m.num_layers, BLOCK, m.num_kv_heads, m.head_dim, torch.bfloat16 if gpu else torch.float32)
                report["bandwidth"] = asyncio.run(bandwidth(cluster.address("decode-0"), layout, device, bw_sizes, transports, args))
            if "b" in parts:
                colocated = create_engine(big, engine_config)
                colocated.warmup()
                prefills = {"layer": cluster.address("prefill-0"), "request": cluster.address("prefill-1")}
                report["ttft"] = asyncio.run(ttft(prefills, cluster.address("decode-0"), colocated,
                                                  colocated.model_config.vocab_size, ttft_sizes, 3 if gpu else 1))
        finally:
            cluster.stop()
    report["wall_s"] = time.monotonic() - started
    print_tables(report)
    (args.out / "kv_transfer.json").write_text(json.dumps(report, indent=2))
    sys.stdout.flush()
    os._exit(0)  # a thread stuck in an NCCL init that never completed must not hold the exit


def print_tables(report: dict) -> None:
    print(f"\nkv_transfer on {report['device']}, {report['date']}, {report['wall_s']:.0f} s")
    for row in report.get("bandwidth", []):
        raw = row["raw_copy_gb_s"]
        pct = lambda gb_s: f"{gb_s:8.1f} GB/s ({100 * gb_s / raw:5.1f}%)"  # noqa: E731
        print(f"\n(a) {row['tokens']} tokens, {row['bytes'] / 2**20:.0f} MiB: raw copy {raw:.1f} GB/s, "
              f"torch gather+scatter {row['gather_scatter_gb_s']:.1f} GB/s, raw NCCL {row.get('raw_nccl')}")
        print("    block copy kernel           back to back           one shot (launch in)   one shot (gated)")
        for label, key in (("in one process", "block_copy"), ("into decode's pool (IPC)", "block_copy_into_ipc_pool")):
            if key in row:
                b = row[key]
                print(f"    {label:27} {pct(b['back_to_back_gb_s'])}  " + "  ".join(
                    pct(b[k]) for k in ("one_shot_gb_s", "one_shot_gated_gb_s") if k in b))
        print("    transfer            checksum  end to end           copy window (% raw)      "
              "claim ms  checksum ms  control ms")
        for key, value in row.items():
            if "/" not in key:
                continue
            if "error" in value:
                print(f"    {key:19} {value['error']}")
                continue
            for setting in ("off", "on"):
                v = value.get(f"checksum_{setting}")
                if v is None:
                    continue
                line = f"    {key:19} {setting:8}  {v['gb_s']:8.1f} GB/s {v['ms']:7.2f} ms"
                if "copy_gb_s" in v:
                    line += (f"  {pct(v['copy_gb_s'])} {v['copy_ms']:6.3f} ms {v['claim_ms']:8.2f} "
                             f"{v['checksum_ms']:12.2f} {v['control_ms']:11.2f}")
                print(line)
    if report.get("ttft"):
        print("\n(b) mode                      tokens  reserve  prefill  transfer  1st decode  TTFT (ms)")
        for r in report["ttft"]:
            print(f"    {r['mode']:25} {r['tokens']:6} {r.get('reserve_ms', 0):8.2f} {r['prefill_ms']:8.2f} "
                  f"{r.get('transfer_ms', 0):9.2f} {r['first_decode_step_ms']:11.2f} {r['ttft_ms']:9.2f}")


if __name__ == "__main__":
    main()
