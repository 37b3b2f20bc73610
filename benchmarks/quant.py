"""Issue 9 benchmark: quantized weights on one GPU, every format against bf16 in the same run.

    python benchmarks/quant.py --out $OUT            # one H200, under 4 minutes
    python benchmarks/quant.py --smoke --out /tmp/q  # CPU, tiny shapes, Triton interpreter (seconds)

Phases (rows print as they go; everything lands in OUT/quant.json):
  ceilings  device-to-device copy bandwidth (read + write bytes / time), the roofline's denominator
  parity    every kernel (gemv, fused mm, dequantize + GEMM, fp8 _scaled_mm) against dequantize-then-matmul
            in float32, at the Llama-3-8B projection shapes, batch 1..256; fails the run past tolerance
  kernels   per shape and batch: bf16 F.linear vs each kernel variant and the variant the layer dispatches to
  sweep     the kernels' launch configurations per shape and batch (GEMV rows per program and tile, the
            fused kernel's tiles, FP8 GEMV vs _scaled_mm), against bf16 F.linear: what the defaults are set from
  decode    dummy:llama-3-8b per format: one decode step (CUDA graph, Triton attention, 128-token contexts)
            at batch 1/16/64/256: tok/s, batch-1 % of the weight-byte roofline, weight and KV memory;
            with --profile 1,256 those batches' steps broken down per kernel (torch.profiler)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the kernels' import: TRITON_INTERPRET is read when they are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stageserve.engine.attention import AttentionMetadata  # noqa: E402
from stageserve.engine.config import EngineConfig  # noqa: E402
from stageserve.engine.loader.weights import load_model  # noqa: E402
from stageserve.engine.quant.formats import quantize_fp8  # noqa: E402
from stageserve.engine.quant.linear import Fp8Linear, PackedLinear, QuantSpec, linear_weight_bytes  # noqa: E402
from stageserve.engine.runner import ModelRunner  # noqa: E402
from stageserve.kernels import quant_matmul as qm  # noqa: E402
from stageserve.kernels import quant_tiles as qtl  # noqa: E402

RESULTS: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not SMOKE else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
ON_GPU = DEVICE.type == "cuda"

# name -> EngineConfig overrides of the decode phase
FORMATS = {
    "bf16": {},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4", "quant_group_size": 128},
    "int4-tiles": {"quantization": "int4", "quant_group_size": 128, "quant_int4_layout": "tiles"},
    "gguf-q4_1": {"quantization": "gguf", "gguf_quant_type": "q4_1"},
    "gguf-q8_0": {"quantization": "gguf", "gguf_quant_type": "q8_0"},
    "fp8": {"quantization": "fp8", "fp8_scaling": "channel"},
}
# weight formats of the kernel phases (plus fp8, which runs through _scaled_mm)
KERNEL_FORMATS = ("int8", "int4", "q4_0", "q4_1", "q8_0")


def log(section: str, **values) -> None:
    RESULTS.setdefault(section, []).append(values)
    shown = {k: v for k, v in values.items() if not isinstance(v, dict)}  # tables go to the JSON only
    print(f"[{section}] " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()), flush=True)


def timed(fn, iters: int) -> float:
    """Median seconds of fn(): on the GPU, GPU time per call from calls replayed in a CUDA graph (launch
    costs excluded, as in a graph-captured decode step); on the CPU, the wall clock."""
    if ON_GPU:
        from stageserve.kernels._common import cuda_graph_time

        return cuda_graph_time(fn, calls=10, replays=max(3, iters // 4))
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def event_time(fn, iters: int) -> float:
    """Median seconds of fn() with CUDA events around each call: for work long enough (a graph replay, a
    2 GiB copy) that launch costs do not count. The copy ceiling is not timed through a graph: a captured
    copy_ measured 2.8 TB/s against 4.2 TB/s eager on the same H200 (2026-12-02), which would flatter every
    roofline percentage."""
    from gpu_engine import cuda_time  # benchmarks/ is on sys.path when this script runs

    return cuda_time(fn, iters)


def ceilings() -> float:
    n = (1 << 30) if ON_GPU else (1 << 20)
    a = torch.randn(n, dtype=torch.bfloat16, device=DEVICE)
    b = torch.empty_like(a)
    copy_s = event_time(lambda: b.copy_(a), 20) if ON_GPU else timed(lambda: b.copy_(a), 3)
    copy_bw = 2 * a.numel() * a.element_size() / copy_s
    log("ceilings", copy_GBps=copy_bw / 1e9, device=torch.cuda.get_device_name() if ON_GPU else "cpu")
    return copy_bw


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def variants(p, batch: int) -> dict:
    """The kernels that can run this packed weight at this batch."""
    out = {}
    if batch <= qm.GEMV_MAX_M:
        out["gemv"] = lambda x: qm.quant_gemv(x, p.qweight, p.scales, p.offsets, p.bits)
        out["gemv_k"] = lambda x: qm.quant_gemv(x, p.qweight, p.scales, p.offsets, p.bits, k_order=True)
        if qm.gluon_supports(p.qweight, p.scales, p.bits):
            out["gluon"] = lambda x: qm.quant_gemv_gluon(x, p.qweight, p.scales, p.offsets, p.bits)
    out["mm"] = lambda x: qm.quant_mm(x, p.qweight, p.scales, p.offsets, p.bits)
    if qm.mm_gluon_supports(p.qweight, p.scales, p.offsets, p.bits):
        out["mm_gluon"] = lambda x: qm.quant_mm_gluon(x, p.qweight, p.scales, p.offsets, p.bits)
    out["dq+gemm"] = lambda x: x @ qm.dequantize(p.qweight, p.scales, p.offsets, p.bits, x.dtype).t()
    return out


def layer_for(fmt: str, w: torch.Tensor):
    """The engine's own layer for this format, to time what the model dispatches to."""
    method = fmt if fmt in ("int8", "int4", "fp8") else "gguf"
    spec = QuantSpec(method=method, gguf_type=fmt if method == "gguf" else "q4_1")
    layer = (Fp8Linear if fmt == "fp8" else PackedLinear)(w.shape[1], w.shape[0], False, spec)
    layer.load(w, DEVICE)
    return layer


def kernel_phases(shapes, batches, iters: int, tol: float) -> bool:
    ok = True
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, generator=gen, device=DEVICE) * 0.02).to(DTYPE)
        for fmt in [*KERNEL_FORMATS, "fp8"]:
            try:
                ok &= kernel_rows(name, fmt, w, batches, iters, tol, gen)
            except Exception as exc:  # logged as a failure; the other formats still run
                log("kernels" if iters else "parity", shape=name, fmt=fmt, error=f"{type(exc).__name__}: {exc}"[:300])
                ok = False
    return ok


def kernel_rows(name, fmt, w, batches, iters, tol, gen) -> bool:
    ok, k = True, w.shape[1]
    layer = layer_for(fmt, w)
    deq = layer.dequantized_weight()  # float32 [N, K]
    for m in batches:
        x = torch.randn(m, k, generator=gen, device=DEVICE).to(DTYPE)
        if fmt == "fp8":
            xq, xs = quantize_fp8(x, True)
            ref = (xq.float() * xs) @ deq.t()
            runs = {"scaled_mm" if ON_GPU else "reference": layer}
        else:
            ref = x.float() @ deq.t()
            runs = variants(layer.packed, m)
        errors = {v: rel_error(fn(x), ref) for v, fn in runs.items()}
        bad = {v: e for v, e in errors.items() if e > tol}
        ok &= not bad
        row = {"shape": name, "fmt": fmt, "batch": m, **{f"err_{v}": e for v, e in errors.items()}}
        if iters:
            bf16_s = timed(lambda: F.linear(x, w), iters)
            times = {v: timed(lambda fn=fn: fn(x), iters) for v, fn in runs.items()}
            chosen = timed(lambda: layer(x), iters)
            row |= {"bf16_us": bf16_s * 1e6, **{f"{v}_us": t * 1e6 for v, t in times.items()},
                    "dispatch_us": chosen * 1e6, "dispatch_vs_bf16": bf16_s / chosen}  # fmt: skip
        log("kernels" if iters else "parity", **row, **({"FAIL": sorted(bad)} if bad else {}))
    return ok


GEMV_CONFIGS = [
    dict(block_n=bn, tile_words=tw, k_order=ko)
    for ko in (False, True) for bn in (4, 8, 16) for tw in (256, 512, 1024, 2048) if not (ko and tw > 1024)
]  # fmt: skip
MM_CONFIGS = [  # block_k in elements (the kernel takes words: block_k * bits / 32)
    dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in (
        (16, 64, 64, 4, 3), (16, 64, 128, 4, 3), (16, 128, 64, 4, 3), (32, 64, 128, 4, 3), (64, 64, 128, 4, 3),
        (64, 128, 64, 8, 3), (64, 128, 128, 8, 3), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3),
    )
]  # fmt: skip

MMT_CONFIGS = [  # quant_mm_t: (mode, block_n, block_k, num_warps, num_stages, split_k); codes: 4-bit with offsets only
    dict(mode=mode, block_n=bn, block_k=bk, num_warps=w, num_stages=st, split_k=sp)
    for mode, bn, bk, w, st, sp in (
        ("codes", 128, 128, 8, 3, None), ("codes", 64, 128, 4, 3, None), ("codes", 128, 128, 8, 4, None),
        ("codes", 64, 128, 4, 4, None), ("codes", 128, 128, 8, 3, 1), ("codes", 64, 64, 4, 3, None),
        ("joins", 128, 128, 8, 3, None), ("joins", 64, 128, 4, 3, None), ("joins", 128, 128, 8, 3, 1),
        ("gather", 64, 128, 4, 3, None), ("gather", 128, 128, 8, 2, None),
    )
]  # fmt: skip


def _gemv(x, args, c):
    return qm.quant_gemv(x, *args, block_n=c["block_n"], block_w=c["tile_words"] // c["block_n"], k_order=c["k_order"])


def _mm(x, args, c):
    return qm.quant_mm(x, *args, block_m=c["block_m"], block_n=c["block_n"], block_w=c["block_k"] * args[3] // 32,
                       num_warps=c["num_warps"], num_stages=c["num_stages"])  # fmt: skip


def _mm_t(x, args, c):
    group = x.shape[1] // args[1].shape[1]  # scales [N, K // group]
    block_k = min(c["block_k"], group) if c["mode"] == "codes" else c["block_k"]
    return qm.quant_mm_t(x, *args, block_n=c["block_n"], block_w=block_k * args[3] // 32, split_k=c["split_k"],
                         gather=c["mode"] == "gather", codes=c["mode"] == "codes", num_warps=c["num_warps"],
                         num_stages=c["num_stages"])  # fmt: skip


def sweep_phase(shapes, batches, iters: int, formats=("int4", "int8", "fp8"), kernels=None) -> None:
    """Every launch configuration per shape, format and batch; one row per (shape, fmt, batch) with the best."""
    from stageserve.kernels import fp8 as fp8k

    gen = torch.Generator(device=DEVICE).manual_seed(1)
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, generator=gen, device=DEVICE) * 0.02).to(DTYPE)
        for fmt in formats:
            layer = layer_for(fmt, w)
            for m in batches:
                x = torch.randn(m, k, generator=gen, device=DEVICE).to(DTYPE)
                bf16_s = timed(lambda: F.linear(x, w), iters)
                runs = {}
                if fmt == "fp8":
                    xq, xs = fp8k.quantize_rows_fp8(x)
                    runs["quant_act"] = lambda: fp8k.quantize_rows_fp8(x)
                    runs["scaled_mm"] = lambda: torch._scaled_mm(xq, layer.weight_fp8.t(), scale_a=xs, scale_b=layer._scale_b, out_dtype=DTYPE)
                    runs["scaled_mm_fast"] = lambda: torch._scaled_mm(
                        xq, layer.weight_fp8.t(), scale_a=xs, scale_b=layer._scale_b, out_dtype=DTYPE, use_fast_accum=True)
                    if m <= fp8k.GEMV_MAX_M:
                        for bn in (2, 4, 8, 16):
                            runs[f"gemv_bn{bn}"] = lambda bn=bn: fp8k.fp8_gemv(xq, xs, layer.weight_fp8, layer.weight_scale, DTYPE, block_n=bn)
                else:
                    p = layer.packed
                    args = (p.qweight, p.scales, p.offsets, p.bits)
                    if m <= qm.GEMV_MAX_M:
                        for c in GEMV_CONFIGS:
                            runs["gemv_" + "_".join(f"{int(v)}" for v in c.values())] = lambda c=c: _gemv(x, args, c)
                        if qm.gluon_supports(p.qweight, p.scales, p.bits):
                            from stageserve.kernels.quant_gemv_gluon import CONFIGS

                            for c in CONFIGS:
                                runs[c.label()] = lambda c=c: qm.quant_gemv_gluon(x, *args, config=c)
                    if m >= 2 and qm.mm_gluon_supports(p.qweight, p.scales, p.offsets, p.bits):
                        from stageserve.kernels.quant_mm_gluon import CONFIGS as TC_CONFIGS

                        for c in TC_CONFIGS:
                            runs[c.label()] = lambda c=c: qm.quant_mm_gluon(x, *args, config=c)
                    if m >= 4:
                        for c in MM_CONFIGS:
                            if c["block_m"] <= max(16, 2 * m):
                                runs["mm_" + "_".join(f"{v}" for v in c.values())] = lambda c=c: _mm(x, args, c)
                    if m >= 2:
                        for c in MMT_CONFIGS:
                            if c["mode"] != "codes" or qm.codes_fit(p.bits, p.group_size, p.offsets is not None):
                                runs["mmt_" + "_".join(f"{v}" for v in c.values())] = lambda c=c: _mm_t(x, args, c)
                    if ON_GPU and qtl.tiles_supports(n, k, p.group_size, p.bits, p.offsets is not None):
                        from stageserve.kernels.quant_ref import tile_int4
                        from stageserve.kernels.quant_tc_tiles import CONFIGS as TILE_CONFIGS

                        tiles = tile_int4(p.qweight)
                        for c in TILE_CONFIGS:
                            runs[c.label()] = lambda c=c, tiles=tiles: qtl.quant_mm_tiles(x, tiles, p.scales, p.offsets, config=c)
                        runs["dq+gemm_tiles"] = lambda tiles=tiles: x @ qtl.dequantize_tiles(tiles, p.scales, p.offsets, x.dtype).t()
                        if m >= 16 and qtl.wg_tiles_supports(n, k, p.group_size, p.bits, True, DEVICE):
                            from stageserve.kernels.quant_wg_tiles import CONFIGS as WG_CONFIGS

                            for c in WG_CONFIGS:
                                runs[c.label()] = lambda c=c, tiles=tiles: qtl.quant_mm_wg_tiles(x, tiles, p.scales, p.offsets, config=c)
                    runs["dq+gemm"] = lambda: x @ qm.dequantize(*args, x.dtype).t()
                    ref = x.float() @ p.dequantize().to(DEVICE).float().t()
                if kernels:
                    runs = {v: fn for v, fn in runs.items() if v.startswith(tuple(kernels))}
                times = {}
                for v, fn in runs.items():
                    try:
                        if v.startswith(("mmt_", "tiles_", "wg_")) and (err := rel_error(fn(), ref)) > 2e-2:
                            log("sweep_error", shape=name, fmt=fmt, batch=m, variant=v, error=f"relative error {err:.3g}")
                            continue
                        times[v] = timed(fn, iters)
                    except Exception as exc:  # a configuration that does not compile or fit: skipped, named
                        log("sweep_error", shape=name, fmt=fmt, batch=m, variant=v, error=f"{type(exc).__name__}: {exc}"[:200])
                ran = {v: t for v, t in times.items() if v != "quant_act"}
                best = min(ran, key=ran.get)
                top = sorted(ran, key=ran.get)[:4]
                log("sweep", shape=name, fmt=fmt, batch=m, bf16_us=bf16_s * 1e6, best=best, best_us=ran[best] * 1e6,
                    best_vs_bf16=bf16_s / ran[best], weight_GBps=layer.weight_bytes() / ran[best] / 1e9,
                    top=" ".join(f"{v}:{ran[v] * 1e6:.1f}" for v in top), all=ran,
                    **({"quant_act_us": times["quant_act"] * 1e6} if "quant_act" in times else {}))  # fmt: skip


def decode_meta(batch: int, ctx: int, block_size: int) -> AttentionMetadata:
    """Batch sequences of ctx cached tokens each, one new token each, in disjoint blocks."""
    per_seq = ctx // block_size + 1
    table = torch.arange(batch * per_seq, device=DEVICE).view(batch, per_seq)
    return AttentionMetadata(
        slot_mapping=table[:, -1] * block_size + ctx % block_size,
        block_tables=table,
        seq_lens=torch.full((batch,), ctx + 1, device=DEVICE),
        query_start_loc=list(range(batch + 1)),
        seq_lens_host=[ctx + 1] * batch,
        max_seq_len=ctx + 1,
    )


def decode_phase(model_name: str, batches: list[int], ctx: int, iters: int, copy_bw: float) -> dict:
    block_size = 16
    loaded = load_model(model_name, device=DEVICE, dtype=DTYPE)
    num_blocks = max(batches) * (ctx // block_size + 1) + 1
    base_tps = {}
    for fmt, overrides in FORMATS.items():
        if fmt == "fp8" and ON_GPU and torch.cuda.get_device_capability() < (8, 9):
            continue
        try:
            decode_format(loaded, fmt, overrides, batches, ctx, iters, copy_bw, base_tps, num_blocks, block_size)
        except Exception as exc:  # one broken format must not cost the others' numbers
            log("decode", fmt=fmt, error=f"{type(exc).__name__}: {exc}"[:300])
        if ON_GPU:
            torch.cuda.empty_cache()
    return base_tps


def decode_format(loaded, fmt, overrides, batches, ctx, iters, copy_bw, base_tps, num_blocks, block_size) -> None:
    t0 = time.monotonic()
    config = EngineConfig(device=DEVICE.type, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max(batches),
                          cuda_graphs=False, **overrides)  # fmt: skip
    before = torch.cuda.memory_allocated() if ON_GPU else 0
    runner = ModelRunner(loaded.config, config, loaded.state_dict, device=DEVICE, dtype=DTYPE)
    model = runner.model
    allocated = (torch.cuda.memory_allocated() - before) if ON_GPU else 0
    weight_bytes = linear_weight_bytes(model)
    other_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "proj" not in n and "lm_head" not in n)
    for batch in batches:
        meta = decode_meta(batch, ctx, block_size)
        ids = torch.randint(0, loaded.config.vocab_size, (batch,), device=DEVICE)
        pos = torch.full((batch,), ctx, device=DEVICE)
        step = lambda: model.compute_logits(model(ids, pos, runner.kv_caches, meta))  # noqa: E731
        with torch.inference_mode():
            if ON_GPU:
                side = torch.cuda.Stream()  # warm up (compile, tune) off the capture's stream, as CudaGraphRunner does
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        step()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                step_s = event_time(graph.replay, iters)
                if PROFILE_BATCHES and batch in PROFILE_BATCHES:
                    profile_step(fmt, batch, graph.replay, step_s, step)
                del graph
            else:
                step_s = timed(step, iters)
        tps = batch / step_s
        row = {"fmt": fmt, "batch": batch, "step_ms": step_s * 1e3, "tok_s": tps}
        if fmt == "bf16":
            base_tps[batch] = tps
        elif batch in base_tps:
            row["vs_bf16"] = tps / base_tps[batch]
        if batch == 1:  # projection weights are what a batch-1 step must read (KV at 128 tokens: ~0.1%)
            roofline = copy_bw / weight_bytes
            row |= {"roofline_tok_s": roofline, "pct_roofline": 100 * tps / roofline}
        log("decode", **row)
    specs = {id(m.spec): m.spec for m in model.modules() if isinstance(m, (PackedLinear, Fp8Linear))}
    for spec in specs.values():  # which kernel the tuner kept per shape and batch bucket
        log("choices", fmt=fmt, kept=" ".join(f"{'x'.join(map(str, key[:-1]))}@{key[-1]}:{name}" for key, name in sorted(spec.choices.items(), key=str)))
    log("memory", fmt=fmt, projection_GiB=weight_bytes / 2**30, other_weights_GiB=other_bytes / 2**30,
        allocated_GiB=allocated / 2**30, kv_GiB=runner.kv_cache_bytes() / 2**30, build_s=time.monotonic() - t0)  # fmt: skip
    del runner, model


PROFILE_BATCHES: set[int] = set()  # --profile: decode batches whose graph replay is broken down per kernel


def profile_step(fmt: str, batch: int, replay, step_s: float, eager, replays: int = 10) -> None:
    """GPU time per kernel name in one decode step (torch.profiler over graph replays, or over eager steps
    where this CUPTI does not see into graphs), and the gaps between kernels (step time minus the kernels'
    sum): which part of the step each format spends its time in."""
    from torch.profiler import ProfilerActivity, profile

    per_name: dict[str, list[float]] = {}
    for source, fn in (("graph", replay), ("eager", eager)):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                fn()
            torch.cuda.synchronize()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name:
                per_name.setdefault(e.name, []).append(e.device_time_total)  # us
        if per_name:
            break
    rows = sorted(((sum(t) / replays, len(t) // replays, n) for n, t in per_name.items()), reverse=True)
    kernels_us = sum(us for us, _, _ in rows)
    log("profile", fmt=fmt, batch=batch, source=source, step_us=step_s * 1e6, kernels_us=kernels_us,
        gaps_us=step_s * 1e6 - kernels_us, kernels_per_step=sum(c for _, c, _ in rows))  # fmt: skip
    for us, calls, name in rows[:14]:
        log("profile", fmt=fmt, batch=batch, us_per_step=us, calls=calls, us_per_call=us / max(calls, 1), kernel=name[:90])


def summary() -> None:
    """The issue's targets, from this run's rows."""
    rows = RESULTS.get("decode", [])
    get = lambda fmt, b: next((r for r in rows if r["fmt"] == fmt and r.get("batch") == b), None)  # noqa: E731
    checks = []
    for fmt, batch, target in (("int4", 1, 2.5), ("int8", 1, 1.6), ("fp8", 256, 1.3)):
        r = get(fmt, batch)
        if r is not None and "vs_bf16" in r:
            checks.append({"target": f"{fmt} batch {batch} >= {target}x bf16", "got": round(r["vs_bf16"], 3), "met": r["vs_bf16"] >= target})
    measured = [r for r in rows if "vs_bf16" in r]
    slower = [f"{r['fmt']}@{r['batch']}: {r['vs_bf16']:.2f}x" for r in measured if r["vs_bf16"] < 1.0]
    if measured:
        checks.append({"target": "no quantized path slower than bf16", "got": slower or "none slower", "met": not slower})
    for c in checks:
        log("targets", **c)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for quant.json")
    parser.add_argument("--phases", default="ceilings,parity,kernels,decode")
    parser.add_argument("--model", default=None, help="default: dummy:llama-3-8b (dummy:tiny with --smoke)")
    parser.add_argument("--ctx", type=int, default=128, help="cached tokens per sequence in the decode phase")
    parser.add_argument("--formats", default=",".join(FORMATS), help="decode-phase formats (bf16 first: the baseline)")
    parser.add_argument("--sweep-batches", default=None, help="sweep phase: batch sizes (default 1,4,16,64,256 on a GPU)")
    parser.add_argument("--sweep-formats", default="int4,int8,fp8", help="sweep phase: formats")
    parser.add_argument("--decode-batches", default=None, help="decode phase: batch sizes (default 1,16,64,256 on a GPU)")
    parser.add_argument("--gemv-configs", type=int, default=None,
                        help="decode phase: the engine's tuner times the first N Gluon GEMV configurations (default its TUNED)")
    parser.add_argument("--sweep-kernels", default=None,
                        help="sweep phase: only variants whose names start with one of these (comma-separated)")
    parser.add_argument("--profile", default="",
                        help="decode phase: batch sizes (comma-separated) whose step is broken down per kernel")
    args = parser.parse_args()
    PROFILE_BATCHES.update(int(b) for b in args.profile.split(",") if b)
    phases = set(args.phases.split(","))
    for name in [f for f in FORMATS if f not in args.formats.split(",")]:
        del FORMATS[name]
    if args.smoke:
        shapes = {"tiny": (96, 256)}
        parity_batches, kernel_batches, decode_batches, iters = [1, 3, 8, 33], [1, 8], [1, 4], 2
        model, ctx = args.model or "dummy:tiny", min(args.ctx, 32)
    else:
        shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
        parity_batches, kernel_batches, decode_batches, iters = [1, 2, 4, 8, 16, 64, 256], [1, 4, 16, 64, 256], [1, 16, 64, 256], 20
        model, ctx = args.model or "dummy:llama-3-8b", args.ctx
    RESULTS.update({"smoke": args.smoke, "device": str(DEVICE), "dtype": str(DTYPE), "torch": torch.__version__, "ctx": ctx})
    t0 = time.monotonic()

    def save() -> None:  # after every phase, so a run cut short by its time limit still leaves its rows
        RESULTS["wall_s"] = time.monotonic() - t0
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "quant.json").write_text(json.dumps(RESULTS, indent=1, default=str))

    ok = True
    copy_bw = ceilings() if "ceilings" in phases else float("nan")
    with torch.inference_mode():
        if "parity" in phases:
            ok &= kernel_phases(shapes, parity_batches, 0, 2e-2 if DTYPE == torch.bfloat16 else 1e-4)
            RESULTS["parity_ok"] = ok
            save()
        if "sweep" in phases:
            batches = [int(b) for b in args.sweep_batches.split(",")] if args.sweep_batches else ([1, 4, 16, 64, 256] if ON_GPU else [1, 8])
            sweep_phase({k: v for k, v in shapes.items() if k not in ("tiny", "o")} or shapes, batches, iters, args.sweep_formats.split(","),
                        args.sweep_kernels.split(",") if args.sweep_kernels else None)
            save()
        if "kernels" in phases:
            kernel_phases({k: v for k, v in shapes.items() if k in ("tiny", "qkv", "down")}, kernel_batches, iters, float("inf"))
            save()
    if "decode" in phases:
        if args.gemv_configs:
            from stageserve.kernels import quant_gemv_gluon

            quant_gemv_gluon.TUNED = args.gemv_configs  # read by PackedLinear each time it lists its kernels
        if args.decode_batches:
            decode_batches = [int(b) for b in args.decode_batches.split(",")]
        decode_phase(model, decode_batches, ctx, iters, copy_bw)
        summary()
    RESULTS["parity_ok"] = ok
    save()
    print(f"parity {'OK' if ok else 'FAILED'}; {RESULTS['wall_s']:.1f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
