"""Issue 10 benchmark: tensor parallelism against TP=1, on one host with `--tp` GPUs (NVLink).

    python benchmarks/tensor_parallel.py --out $OUT --model /path/SmolLM2.gguf [--tp 2] [--phases logits,greedy,decode,allreduce]
    python benchmarks/tensor_parallel.py --out /tmp/tp --smoke          # CPU, gloo, tiny dummy shapes, seconds

Phases (correctness first; each prints rows as it goes; JSON lands in OUT/tensor_parallel.json):
  logits     dummy:llama-3-8b bf16: TP=N vs TP=1 logits of a prefill and greedy decode steps (relative error,
             top-1 agreement), compared step by step while the two greedy paths agree
  greedy     the default model in float32 (TF32 off): greedy tokens TP=N vs TP=1 on 5 prompts
             (SmolLM2's 3 KV heads split 1 + 2 over 2 GPUs)
  decode     batch-1 decode tok/s of dummy:llama-3-8b bf16, CUDA graphs on: TP=1, TP=N, scaling, each vs its
             weight roofline (weight bytes per GPU / measured copy bandwidth)
  allreduce  NCCL all-reduce on N ranks through the engine's own communicator: one [1, hidden] bf16 all-reduce,
             a CUDA graph of a decode step's worth (2 x layers + 1), and the bus bandwidth of a 256 MiB one;
             the per-step all-reduce time against its bandwidth floor and against the measured TP=N step time
  decode70b  (4 GPUs, not in the default list) dummy:llama-3-70b bf16 at TP=N: batch-1 tok/s vs the roofline
             over N GPUs, and output tok/s at 64 concurrent
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.engine.loader.dummy import DUMMY_SHAPES
from stageserve.engine.parallel.comm import TPCommunicator, open_store
from stageserve.sample.params import SamplingParams

RESULTS: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def log(section: str, **values) -> None:
    RESULTS.setdefault(section, []).append(values)
    print(f"[{section}] " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()), flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_engine(model: str, tp: int, args, **overrides) -> LLMEngine:
    fields = {"device": args.device, "tensor_parallel_size": tp, "num_blocks": 512, "max_num_seqs": 64, **overrides}
    from stageserve.engine.factory import create_engine

    engine = create_engine(model, EngineConfig(**fields))
    engine.warmup()
    return engine


def release(engine: LLMEngine | None) -> None:
    if engine is not None and hasattr(engine.runner, "close"):
        engine.runner.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def recorded_run(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    logits, sampler = [], engine.runner.sampler

    def recording(step_logits, rows):
        logits.append(step_logits.float().cpu())
        return sampler(step_logits, rows)

    engine.runner.sampler = recording
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    out = engine.generate(prompts, params)
    engine.runner.sampler = sampler
    return [r.output_token_ids for r in out], logits


def phase_logits(args) -> None:
    model = args.shape_8b
    vocab = DUMMY_SHAPES[model.removeprefix("dummy:")].vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (7, 33, 120)]
    runs = {}
    for tp in (1, args.tp):
        engine = make_engine(model, tp, args, dtype=args.dtype)
        runs[tp] = recorded_run(engine, prompts, args.new_tokens)
        release(engine)
    (ref_tokens, ref_logits), (tp_tokens, tp_logits) = runs[1], runs[args.tp]
    agree, worst, steps = 0, 0.0, 0
    for a, b in zip(tp_logits, ref_logits):
        if a.shape != b.shape:
            break
        rel = ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()
        worst, steps = max(worst, rel), steps + 1
        agree += int((a.argmax(-1) == b.argmax(-1)).all())
        if not torch.equal(a.argmax(-1), b.argmax(-1)):
            break  # the greedy paths part here; later logits see different contexts
    same = sum(x == y for x, y in zip(tp_tokens, ref_tokens))
    log("logits", model=model, dtype=args.dtype, tp=args.tp, steps_compared=steps, max_rel_err=worst,
        steps_top1_agree=f"{agree}/{steps}", identical_greedy_prompts=f"{same}/{len(prompts)}",
        ok=bool(worst < (2e-2 if args.dtype == "bfloat16" else 1e-4)))


def phase_greedy(args) -> None:
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    from stageserve.tokenizer.text_tokenizer import load_tokenizer

    texts = ["The history of the Roman Empire", "def quicksort(arr):", "Q: What is 17 times 23?\nA:",
             "Write a haiku about the ocean.", "Les fleurs du printemps sont"]
    if args.smoke:
        prompts = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12]]
    else:
        tok = load_tokenizer(args.model)
        prompts = [tok.encode(t) for t in texts]
    tokens = {}
    for tp in (1, args.tp):
        engine = make_engine(args.model, tp, args, dtype="float32")
        tokens[tp], _ = recorded_run(engine, prompts, args.new_tokens)
        release(engine)
    same = sum(a == b for a, b in zip(tokens[1], tokens[args.tp]))
    log("greedy", model=Path(args.model).name, dtype="float32", tp=args.tp, identical_prompts=f"{same}/{len(prompts)}",
        ok=same == len(prompts))


def decode_tok_s(engine: LLMEngine, prompt_len: int, new_tokens: int, batch: int, device: str) -> float:
    """Output tok/s over the decode phase of `batch` requests started together."""
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}-{time.monotonic_ns()}", torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), params)
    while engine.scheduler.num_waiting or any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.requests.values()):
        engine.step()  # prefill
    sync(device)
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished():
        tokens += len(engine.step())
    sync(device)
    return tokens / (time.perf_counter() - start)


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy, read + write bytes per second (the batch-1 decode ceiling)."""
    n = (1 << 30) if device == "cuda" else (1 << 24)
    a = torch.randn(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * a.numel() * a.element_size() / statistics.median(times)


def weight_bytes(engine: LLMEngine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())


def phase_decode(args, model: str, tps: tuple[int, ...], section: str, concurrency: int = 0, **overrides) -> None:
    copy_bw = copy_bandwidth(args.device)
    rates = {}
    for tp in tps:
        engine = make_engine(model, tp, args, dtype=args.dtype, **overrides)
        per_gpu = weight_bytes(engine)  # rank 0's shard: every rank reads as much, at the same time
        rates[tp] = decode_tok_s(engine, 128, args.new_tokens * 4, 1, args.device)
        roofline = copy_bw / per_gpu
        log(section, model=model, dtype=args.dtype, tp=tp, batch=1, tok_s=rates[tp], step_ms=1e3 / rates[tp],
            roofline_tok_s=roofline, pct_of_roofline=100 * rates[tp] / roofline, weight_GB_per_gpu=per_gpu / 1e9)
        if concurrency:
            rate = decode_tok_s(engine, 512, args.new_tokens * 2, concurrency, args.device)
            log(section, model=model, tp=tp, batch=concurrency, output_tok_s=rate)
        release(engine)
    if len(tps) == 2:
        log(section, model=model, scaling=rates[tps[1]] / rates[tps[0]], target=1.6)
    RESULTS.setdefault("step_ms", {})[f"{model}@tp{tps[-1]}"] = 1e3 / rates[tps[-1]]


def allreduce_rank(rank: int, size: int, store, device_name: str, hidden: int, calls: int) -> dict:
    """One rank of the all-reduce micro-benchmark, on the engine's own communicator."""
    device = torch.device(device_name, rank) if device_name == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    comm = TPCommunicator(store, rank, size, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.ones(1, hidden, dtype=dtype, device=device)
    big = torch.ones((256 << 20) // 2 if device.type == "cuda" else 1 << 20, dtype=dtype, device=device)

    def timed(fn, iters: int) -> float:
        for _ in range(3):
            fn()
        sync(device.type)
        comm.all_ok(True)  # line the ranks up
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device.type)
        return (time.perf_counter() - t) / iters

    one = timed(lambda: comm.all_reduce(x), 200)
    step_fn = lambda: [comm.all_reduce(x) for _ in range(calls)]  # noqa: E731
    if device.type == "cuda":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step_fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step_fn()
        step = timed(graph.replay, 50)
    else:
        step = timed(step_fn, 5)
    big_s = timed(lambda: comm.all_reduce(big), 10)
    bus_bw = 2 * (size - 1) / size * big.numel() * big.element_size() / big_s
    return {"one_us": one * 1e6, "step_us": step * 1e6, "bus_GBps": bus_bw / 1e9, "bytes": x.numel() * x.element_size()}


def phase_allreduce(args) -> None:
    shape = DUMMY_SHAPES[args.shape_8b.removeprefix("dummy:")]
    calls = 2 * shape.num_layers + 1  # after attention and MLP in every layer, plus the embedding
    store = open_store(0, args.tp)
    children = [subprocess.Popen([sys.executable, __file__, "--allreduce-rank", str(r), "--tp", str(args.tp),
                                  "--allreduce-port", str(store.port), "--device", args.device,
                                  "--allreduce-hidden", str(shape.hidden_size), "--allreduce-calls", str(calls)])
                for r in range(1, args.tp)]
    try:
        r = allreduce_rank(0, args.tp, store, args.device, shape.hidden_size, calls)
    finally:
        for c in children:
            try:
                c.wait(120)
            except subprocess.TimeoutExpired:
                c.kill()
    floor_us = calls * 2 * (args.tp - 1) / args.tp * r["bytes"] / (r["bus_GBps"] * 1e9) * 1e6
    step_ms = RESULTS.get("step_ms", {}).get(f"{args.shape_8b}@tp{args.tp}")
    log("allreduce", tp=args.tp, hidden=shape.hidden_size, one_allreduce_us=r["one_us"], calls_per_step=calls,
        per_step_us=r["step_us"], bandwidth_floor_us=floor_us, bus_GBps=r["bus_GBps"],
        share_of_step=(r["step_us"] / 1e3 / step_ms) if step_ms else "n/a (run decode first)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for tensor_parallel.json")
    parser.add_argument("--model", default=None, help="the default model's .gguf file (greedy phase)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--phases", default="logits,greedy,decode,allreduce")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="CPU + gloo, tiny dummy shapes: checks the script runs")
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--allreduce-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--allreduce-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--allreduce-hidden", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--allreduce-calls", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allreduce_rank is not None:  # a child of phase_allreduce
        store = open_store(args.allreduce_rank, args.tp, args.allreduce_port)
        allreduce_rank(args.allreduce_rank, args.tp, store, args.device, args.allreduce_hidden, args.allreduce_calls)
        return
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.dtype = "float32" if args.smoke else "bfloat16"
    args.shape_8b = "dummy:tiny-gqa3" if args.smoke else "dummy:llama-3-8b"
    if args.smoke:
        args.model, args.new_tokens = "dummy:tiny-qwen2", min(args.new_tokens, 4)
    elif args.model is None:
        from stageserve.engine.loader.default_model import default_model_path

        args.model = str(default_model_path())
    RESULTS.update(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu (gloo)", tp=args.tp, smoke=args.smoke,
                   command=" ".join(sys.argv))
    phases = args.phases.split(",")
    try:
        if "logits" in phases:
            phase_logits(args)
        if "greedy" in phases:
            phase_greedy(args)
        if "decode" in phases:
            phase_decode(args, args.shape_8b, (1, args.tp), "decode")
        if "allreduce" in phases:
            phase_allreduce(args)
        if "decode70b" in phases:
            phase_decode(args, "dummy:tiny" if args.smoke else "dummy:llama-3-70b", (args.tp,), "decode70b", concurrency=64,
                         num_blocks=4096, max_num_batched_tokens=2048)  # 64 x (512 + 64) tokens resident, no preemption
    finally:
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "tensor_parallel.json").write_text(json.dumps(RESULTS, indent=2, default=str))


if __name__ == "__main__":
    main()
