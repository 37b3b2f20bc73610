"""Issue 4 benchmark: the engine on one GPU against the limits measured in the same run.

    python benchmarks/gpu_engine.py --model /path/SmolLM2.gguf [--phases ceilings,parity,batch1,throughput,hf]

Phases (each prints rows as it goes; everything lands in $OUT/gpu_engine.json when OUT is set):
  ceilings    device-to-device copy bandwidth (read + write bytes) and the bf16 matmul rate
  parity      default model greedy: GPU float32 (TF32 off, both attention backends) vs the CPU engine,
              and GPU bfloat16 vs CPU float32 with the top-5 cross-check where they diverge
  batch1      batch-1 decode tok/s, dummy:llama-3-8b bf16 and the default model, vs weight-bytes / copy BW
  throughput  dummy:llama-3-8b, 512-token prompts, 256 new tokens, at concurrency 1/16/64/256:
              output tok/s, TTFT and ITL percentiles; TTFT of one 2,048-token prompt vs the FLOP floor
  hf          HF transformers generate on the same GPU: the naive baseline at the same batch sizes
  profile     where a batch-1 decode step's time goes: GPU kernel time and count per step vs wall time
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.engine.factory import create_engine
from stageserve.sample.params import SamplingParams

RESULTS: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def log(section: str, **values) -> None:
    RESULTS.setdefault(section, []).append(values)
    print(f"[{section}] " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()), flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def cuda_time(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ceilings() -> tuple[float, float]:
    n = 1 << 30  # 2 GiB of bf16 each way
    a = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    copy_s = cuda_time(lambda: b.copy_(a))
    copy_bw = 2 * a.numel() * a.element_size() / copy_s
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = cuda_time(lambda: x @ y)
    flops = 2 * 8192**3 / mm_s
    log("ceilings", copy_GBps=copy_bw / 1e9, bf16_matmul_TFLOPs=flops / 1e12, gpu=torch.cuda.get_device_name())
    return copy_bw, flops


def engine_for(model, **overrides) -> LLMEngine:
    config = EngineConfig(**{"device": "cuda", "num_blocks": 2048, "max_num_seqs": 256, "max_num_batched_tokens": 8192, **overrides})
    engine = create_engine(model, config)
    engine.warmup()
    return engine


def release(*objs) -> None:
    for o in objs:
        del o
    gc.collect()
    torch.cuda.empty_cache()


def parity(model_path: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    prompts_text = ["The history of the Roman Empire", "def quicksort(arr):", "Q: What is 17 times 23?\nA:",
                    "Write a haiku about the ocean.", "Les fleurs du printemps sont"]
    cpu = create_engine(model_path, EngineConfig(device="cpu", dtype="float32", num_blocks=256))
    from stageserve.tokenizer.text_tokenizer import load_tokenizer

    tok = load_tokenizer(model_path)
    prompts = [tok.encode(t) for t in prompts_text]
    params = SamplingParams(max_tokens=32, min_tokens=32, temperature=0.0, logprobs=5)
    ref = cpu.generate(prompts, params)
    for backend in ("torch", "triton"):
        for graphs in ((False, True) if backend == "triton" else (False,)):
            gpu = engine_for(model_path, dtype="float32", attention_backend=backend, cuda_graphs=graphs, num_blocks=256)
            out = gpu.generate(prompts, params)
            same = sum(a.output_token_ids == b.output_token_ids for a, b in zip(out, ref))
            log("parity", dtype="float32", backend=backend, cuda_graphs=graphs, identical_prompts=f"{same}/{len(prompts)}")
            release(gpu)
    gpu = engine_for(model_path, dtype="bfloat16", num_blocks=256)
    out = gpu.generate(prompts, params)
    diverged, crosscheck_ok = 0, 0
    for a, b in zip(out, ref):
        for i, (x, y) in enumerate(zip(a.output_token_ids, b.output_token_ids)):
            if x != y:
                diverged += 1
                in_ref = x in [t for t, _ in b.output_top_logprobs[i]]
                in_gpu = y in [t for t, _ in a.output_top_logprobs[i]]
                crosscheck_ok += in_ref and in_gpu
                break
    log("parity", dtype="bfloat16", backend="auto", prompts_diverged=diverged, first_divergence_in_other_top5=f"{crosscheck_ok}/{diverged}")
    release(gpu, cpu)


def decode_tok_s(engine: LLMEngine, prompt_len: int, new_tokens: int, batch: int = 1) -> tuple[float, float, list[float], list[float]]:
    """(output tok/s over the decode phase, wall s, ttfts, itls) for `batch` requests started together."""
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    vocab = engine.model_config.vocab_size
    reqs = [engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}", torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), params)
            for i in range(batch)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    last: dict[str, float] = {}
    ttfts, itls = [], []
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id in last:
                itls.append(now - last[o.request_id])
            else:
                ttfts.append(now - start)
            last[o.request_id] = now
    wall = time.perf_counter() - start
    first_done = max(ttfts)
    decode_tokens = sum(len(r.output_token_ids) - 1 for r in reqs)
    return decode_tokens / (wall - first_done), wall, ttfts, itls


def batch1(model_path: str, copy_bw: float) -> None:
    for name in ("dummy:llama-3-8b", model_path):
        engine = engine_for(name, dtype="bfloat16", max_num_seqs=16, num_blocks=512)
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
        roofline = copy_bw / weight_bytes
        captured = engine.runner.graphs
        for graphs in (True, False):
            engine.runner.graphs = captured if graphs else None  # the same engine, replaying or eager
            tok_s, *_ = decode_tok_s(engine, 128, 256)
            log("batch1", model=name.split("/")[-1], cuda_graphs=graphs, tok_s=tok_s, roofline_tok_s=roofline,
                pct_of_roofline=100 * tok_s / roofline, weight_GB=weight_bytes / 1e9)
        release(engine)


def throughput(copy_bw: float, flops: float) -> None:
    engine = engine_for("dummy:llama-3-8b", dtype="bfloat16", num_blocks=13000, max_num_seqs=256)
    for concurrency in (1, 16, 64, 256):
        tok_s, wall, ttfts, itls = decode_tok_s(engine, 512, 256, batch=concurrency)
        out_tok_s = concurrency * 256 / wall
        log("throughput", concurrency=concurrency, output_tok_s=out_tok_s, decode_phase_tok_s=tok_s,
            ttft_p50_ms=1e3 * pct(ttfts, 50), ttft_p90_ms=1e3 * pct(ttfts, 90), ttft_p99_ms=1e3 * pct(ttfts, 99),
            itl_p50_ms=1e3 * pct(itls, 50), itl_p90_ms=1e3 * pct(itls, 90), itl_p99_ms=1e3 * pct(itls, 99))
    params = sum(p.numel() for p in engine.runner.model.parameters())
    _, _, ttfts, _ = decode_tok_s(engine, 2048, 2)
    floor = 2 * params * 2048 / flops
    log("ttft_2048", ttft_ms=1e3 * ttfts[0], flop_floor_ms=1e3 * floor, ratio_to_floor=ttfts[0] / floor)
    release(engine)


def hf_baseline(concurrencies: list[int]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from stageserve.engine.loader.dummy import DUMMY_SHAPES

    c = DUMMY_SHAPES["llama-3-8b"]
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                         max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta, tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    for concurrency in concurrencies:
        ids = torch.randint(0, c.vocab_size, (concurrency, 512), device="cuda")
        with torch.no_grad():
            model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=256, min_new_tokens=256, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        log("hf", concurrency=concurrency, output_tok_s=concurrency * 256 / wall)
    release(model)


def profile_step(model_path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name in (model_path, "dummy:llama-3-8b"):
        engine = engine_for(name, dtype="bfloat16", max_num_seqs=16, num_blocks=512)
        params = SamplingParams(max_tokens=64, min_tokens=64, temperature=0.0, ignore_eos=True)
        engine.add_request("p", list(range(100, 228)), params)
        for _ in range(8):
            engine.step()
        torch.cuda.synchronize()
        steps = 20
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / steps
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_s = sum(e.device_time_total for e in kernels) / 1e6 / steps
        top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]
        log("profile", model=name.split("/")[-1], wall_ms_per_step=1e3 * wall, gpu_kernel_ms_per_step=1e3 * gpu_s,
            kernels_per_step=len(kernels) / steps, host_not_overlapped_ms=1e3 * (wall - gpu_s),
            top_kernels="; ".join(f"{e.key[:40]} {e.device_time_total / steps:.0f}us" for e in top))
        release(engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the default model's .gguf file")
    parser.add_argument("--phases", default="ceilings,parity,batch1,throughput,hf")
    parser.add_argument("--hf-concurrency", default="1,16,64,256")
    args = parser.parse_args()
    phases = args.phases.split(",")
    copy_bw, flops = ceilings()
    try:
        if "parity" in phases:
            parity(args.model)
        if "batch1" in phases:
            batch1(args.model, copy_bw)
        if "throughput" in phases:
            throughput(copy_bw, flops)
        if "profile" in phases:
            profile_step(args.model)
        if "hf" in phases:
            hf_baseline([int(x) for x in args.hf_concurrency.split(",")])
    finally:
        out = os.environ.get("OUT")
        if out:
            Path(out, "gpu_engine.json").write_text(json.dumps(RESULTS, indent=2, default=str))


if __name__ == "__main__":
    main()
