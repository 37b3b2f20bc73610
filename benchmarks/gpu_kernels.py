"""GPU check and benchmark of the Triton kernels in `kernels/` (H100 / H200).

1. Correctness at full shapes (head_dim 128, 32 query / 8 KV heads, block 16, contexts to 4k, batch 64):
   each kernel against its reference (float64 for attention), relative and max absolute error, poisoned
   outputs. Sampling: exact token agreement with the sort-based reference.
2. Timings: `triton.testing.do_bench` medians (it clears L2 before every run), achieved GB/s over the
   fewest bytes each kernel must move, attention also as a fraction of a measured device-to-device copy
   (read + write bytes) and in TFLOP/s; the plain-torch path the engine uses today as a baseline; and
   sweeps of the decode split count and prefill tile shapes, to check the heuristics.

    python benchmarks/gpu_kernels.py            # on the GPU machine; JSON to $OUT/gpu_kernels.json if OUT is set
    python benchmarks/gpu_kernels.py --smoke    # tiny shapes, any machine (CPU: Triton interpreter), no timing value
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_stageserve() -> None:
    """Map `stageserve` -> services/ and `stageserve.kernels` -> kernels/ when the project is not installed."""
    if importlib.util.find_spec("stageserve") is not None:
        return
    for name, folder in (("stageserve", ROOT / "services"), ("stageserve.kernels", ROOT / "kernels")):
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


@dataclass(frozen=True)
class Shapes:
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    context: int = 4096
    batch: int = 64
    hidden: int = 4096
    intermediate: int = 14336
    tokens: int = 4096  # prefill-sized token count for the elementwise kernels
    vocab: int = 128256
    decode_batches: tuple[int, ...] = (1, 8, 32, 64)
    split_sweep: tuple[int, ...] = (1, 2, 4, 8, 16)
    prefill_seqs: tuple[tuple[int, int], ...] = ((4096, 512), (1500, 1500), (777, 1), (3000, 100), (17, 17))
    prefill_fresh: tuple[int, int] = (8, 1024)  # batch x prompt length, no cached prefix
    prefill_chunk: tuple[int, int, int] = (4, 4096, 512)  # batch, context, new tokens


SMOKE = Shapes(
    num_heads=4, num_kv_heads=2, head_dim=64, context=40, batch=3, hidden=256, intermediate=128, tokens=5,
    vocab=300, decode_batches=(1, 3), split_sweep=(1, 2), prefill_seqs=((40, 23), (5, 5)),
    prefill_fresh=(2, 20), prefill_chunk=(2, 40, 8),
)  # fmt: skip


class Runner:
    """Checks and timings, collected as rows for the table and the JSON."""

    def __init__(self, shapes: Shapes, device: torch.device, smoke: bool):
        self.s, self.device, self.smoke = shapes, device, smoke
        self.gen = torch.Generator(device=device).manual_seed(1234)
        self.checks: list[dict] = []
        self.timings: list[dict] = []
        self.copy_gbps = float("nan")

    # ------------------------------------------------------------------------------------------ tools

    def time_ms(self, fn) -> float:
        if self.smoke:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def check(self, kernel: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
        from stageserve.kernels.testing import rel_error

        err = rel_error(out, ref)
        max_abs = (out.double() - ref.double()).abs().max().item() if err != float("inf") else float("inf")
        self.checks.append({"kernel": kernel, "rel_err": err, "max_abs_err": max_abs, "tol": tol, "ok": err < tol})

    def timing(self, kernel: str, shape: str, ms: float, nbytes: int, *, flops: float = 0.0, baseline_ms=None) -> None:
        gbps = nbytes / ms / 1e6
        self.timings.append({
            "kernel": kernel, "shape": shape, "ms": ms, "bytes": nbytes, "gb_s": gbps,
            "frac_copy_bw": gbps / self.copy_gbps, "tflop_s": flops / ms / 1e9 if flops else None,
            "baseline_ms": baseline_ms, "speedup": baseline_ms / ms if baseline_ms else None,
        })  # fmt: skip

    def batch(self, seq_lens, query_lens, dtype=torch.bfloat16):
        from stageserve.kernels.testing import make_paged_batch

        s = self.s
        return make_paged_batch(
            list(seq_lens), list(query_lens), num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
            head_dim=s.head_dim, block_size=s.block_size, dtype=dtype, device=self.device, generator=self.gen,
        )  # fmt: skip

    def randn(self, *shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, generator=self.gen, device=self.device) * scale).to(dtype)

    # ------------------------------------------------------------------------------------------ copy

    def measure_copy(self) -> None:
        n = (1 << 14) if self.smoke else (1 << 28)  # 1 GiB of float32
        src = torch.randn(n, device=self.device, generator=self.gen)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        self.copy_gbps = 2 * src.numel() * src.element_size() / ms / 1e6
        self.timings.append({"kernel": "copy (d2d)", "shape": f"{n * 4 >> 20} MiB", "ms": ms, "bytes": 2 * n * 4,
                             "gb_s": self.copy_gbps, "frac_copy_bw": 1.0})  # fmt: skip

    # ------------------------------------------------------------------------------------------ attention

    def attention(self) -> None:
        from stageserve.engine.attention import TorchAttention
        from stageserve.kernels.paged_decode_attention import paged_attention_ref, paged_decode_attention
        from stageserve.kernels.prefill_attention import prefill_attention
        from stageserve.kernels.testing import TOLERANCE

        s, tol = self.s, TOLERANCE[torch.bfloat16]
        lens = torch.randint(1, s.context + 1, (s.batch,), generator=self.gen, device=self.device).tolist()
        lens[:3] = [s.context, 1, 17]
        for name, qlens, splits in (
            ("decode", [1] * s.batch, None),
            ("decode splits=8", [1] * s.batch, 8),
            ("spec decode q<=8", [min(8, n, 1 + i % 8) for i, n in enumerate(lens[: s.batch // 2])], None),
        ):
            b = self.batch(lens[: len(qlens)], qlens)
            spec = b.max_query_len > 1
            out = torch.full_like(b.q, float("nan"))
            paged_decode_attention(
                b.q, b.kv_cache, b.block_tables, b.seq_lens, b.scale, b.max_seq_len, num_splits=splits,
                query_start_loc=b.query_start_loc if spec else None, max_query_len=b.max_query_len, out=out,
            )  # fmt: skip
            ref = paged_attention_ref(b.q, b.kv_cache, b.block_tables, b.seq_lens_host, b.query_start_loc_host, b.scale)
            self.check(name, out, ref, tol)
        b = self.batch([c for c, _ in s.prefill_seqs], [n for _, n in s.prefill_seqs])
        out = torch.full_like(b.q, float("nan"))
        prefill_attention(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.scale, b.max_query_len, out=out)
        ref = paged_attention_ref(b.q, b.kv_cache, b.block_tables, b.seq_lens_host, b.query_start_loc_host, b.scale)
        self.check("prefill (prefix + chunk)", out, ref, tol)
        del ref

        # Decode timings: every sequence at the full context.
        torch_decode_ms = None
        for batch in s.decode_batches:
            b = self.batch([s.context] * batch, [1] * batch)
            args = (b.q, b.kv_cache, b.block_tables, b.seq_lens, b.scale, b.max_seq_len)
            nbytes = b.kv_bytes() + 2 * b.q.numel() * b.q.element_size()
            flops = 4 * batch * s.context * s.num_heads * s.head_dim
            if batch == s.decode_batches[-1]:
                meta = _meta(b)
                torch_decode_ms = self.time_ms(lambda: TorchAttention._decode(b.q, b.kv_cache, meta, b.scale))
            ms = self.time_ms(lambda: paged_decode_attention(*args))
            self.timing("decode", f"b={batch} ctx={s.context}", ms, nbytes, flops=flops,
                        baseline_ms=torch_decode_ms if batch == s.decode_batches[-1] else None)  # fmt: skip
            if batch in (s.decode_batches[0], s.decode_batches[len(s.decode_batches) // 2]):
                for splits in s.split_sweep:
                    ms = self.time_ms(lambda: paged_decode_attention(*args, num_splits=splits))
                    self.timing("decode sweep", f"b={batch} splits={splits}", ms, nbytes, flops=flops)
        batch = s.decode_batches[len(s.decode_batches) // 2]
        b = self.batch([s.context] * batch, [4] * batch)
        ms = self.time_ms(lambda: paged_decode_attention(
            b.q, b.kv_cache, b.block_tables, b.seq_lens, b.scale, b.max_seq_len,
            query_start_loc=b.query_start_loc, max_query_len=4,
        ))  # fmt: skip
        self.timing("spec decode", f"b={batch} q=4 ctx={s.context}", ms, b.kv_bytes(), flops=4 * 4 * batch * s.context * s.num_heads * s.head_dim)

        # Prefill: fresh prompts (vs torch SDPA on contiguous tensors) and a chunk over a long cached prefix.
        nseq, length = s.prefill_fresh
        b = self.batch([length] * nseq, [length] * nseq)
        flops = 4 * nseq * (length * (length + 1) // 2) * s.num_heads * s.head_dim
        q4 = self.randn(nseq, s.num_heads, length, s.head_dim)
        k4 = self.randn(nseq, s.num_kv_heads, length, s.head_dim)
        v4 = self.randn(nseq, s.num_kv_heads, length, s.head_dim)
        sdpa_ms = self.time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q4, k4, v4, is_causal=True, enable_gqa=True))  # fmt: skip
        self.timing("sdpa (contiguous)", f"{nseq}x{length} causal", sdpa_ms, 0, flops=flops)
        configs = [None, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                   {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}]  # fmt: skip
        for cfg in configs if not self.smoke else [None]:
            ms = self.time_ms(lambda: prefill_attention(
                b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.scale, b.max_query_len, config=cfg))
            label = "default" if cfg is None else f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']}"
            self.timing("prefill", f"{nseq}x{length} {label}", ms, b.kv_bytes(), flops=flops, baseline_ms=sdpa_ms)
        nseq, context, new = s.prefill_chunk
        b = self.batch([context] * nseq, [new] * nseq)
        flops = 4 * nseq * sum(context - new + i + 1 for i in range(new)) * s.num_heads * s.head_dim
        ms = self.time_ms(lambda: prefill_attention(
            b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.scale, b.max_query_len))
        self.timing("prefill chunk", f"{nseq}x{new} over {context - new}", ms, b.kv_bytes(), flops=flops)

    # ------------------------------------------------------------------------------------------ elementwise

    def elementwise(self) -> None:
        import torch.nn.functional as F

        from stageserve.engine.attention import write_kv
        from stageserve.engine.model import apply_rope
        from stageserve.kernels.activation import silu_and_mul, silu_and_mul_ref
        from stageserve.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref
        from stageserve.kernels.rope_cache import rope_and_cache, rope_cache_ref
        from stageserve.kernels.testing import TOLERANCE

        s, dt, tol = self.s, torch.bfloat16, TOLERANCE[torch.bfloat16]
        for n in (s.tokens, s.batch):
            x, r = self.randn(n, s.hidden, scale=2.0), self.randn(n, s.hidden)
            w = self.randn(s.hidden, scale=0.1) + 1
            if n == s.tokens:
                out, res = fused_add_rms_norm(x, r, w, 1e-5)
                ref_out, ref_res = fused_add_rms_norm_ref(x, r, w, 1e-5)
                self.check("fused_add_rms_norm", out, ref_out, tol)
                self.check("fused_add_rms_norm residual", res, ref_res, 1e-12)
            nbytes = 4 * x.numel() * 2 + w.numel() * 2
            base = self.time_ms(lambda: fused_add_rms_norm_ref(x, r, w, 1e-5))
            ms = self.time_ms(lambda: fused_add_rms_norm(x, r, w, 1e-5))
            self.timing("fused_add_rms_norm", f"{n}x{s.hidden}", ms, nbytes, baseline_ms=base)

        for n in (s.tokens, s.batch):
            g = self.randn(n, 2 * s.intermediate, scale=3.0)
            if n == s.tokens:
                self.check("silu_and_mul", silu_and_mul(g), silu_and_mul_ref(g), tol)
            base = self.time_ms(lambda: F.silu(g[:, : s.intermediate]) * g[:, s.intermediate :])
            ms = self.time_ms(lambda: silu_and_mul(g))
            self.timing("silu_and_mul", f"{n}x{s.intermediate}", ms, 3 * n * s.intermediate * 2, baseline_ms=base)

        num_blocks = (s.tokens + s.batch) // s.block_size + 8
        for n in (s.tokens, s.batch):
            width = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
            qkv = self.randn(n, width)
            q, k, v = qkv.split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim], -1)
            q, k, v = (t.view(n, -1, s.head_dim) for t in (q, k, v))
            cache = torch.zeros(2, num_blocks, s.block_size, s.num_kv_heads, s.head_dim, dtype=dt, device=self.device)
            slots = torch.randperm(num_blocks * s.block_size, generator=self.gen, device=self.device)[:n]
            positions = torch.randint(0, 8192, (n,), generator=self.gen, device=self.device)
            cos, sin = self.randn(8192, s.head_dim // 2, dtype=torch.float32), self.randn(8192, s.head_dim // 2, dtype=torch.float32)
            if n == s.tokens:
                ref_cache = cache.clone()
                ref_q = rope_cache_ref(q, k, v, positions, cos, sin, ref_cache, slots)
                self.check("rope_and_cache q", rope_and_cache(q, k, v, positions, cos, sin, cache, slots), ref_q, tol)
                self.check("rope_and_cache cache", cache, ref_cache, tol)
            rows = (cos[positions].unsqueeze(1).to(dt), sin[positions].unsqueeze(1).to(dt))

            def torch_path():
                qk = apply_rope(qkv[:, : (s.num_heads + s.num_kv_heads) * s.head_dim].view(n, -1, s.head_dim), *rows)
                write_kv(qk[:, s.num_heads :], v, cache, slots)

            nbytes = (2 * q.numel() + 2 * k.numel() + 2 * v.numel()) * 2 + n * s.head_dim * 4 + n * 16
            base = self.time_ms(torch_path)
            ms = self.time_ms(lambda: rope_and_cache(q, k, v, positions, cos, sin, cache, slots))
            self.timing("rope_and_cache", f"{n} tok", ms, nbytes, baseline_ms=base)

    # ------------------------------------------------------------------------------------------ sampling

    def sampling(self) -> None:
        from stageserve.kernels.sampling import sample, sample_ref
        from stageserve.sample.sampler import apply_top_k_top_p

        s = self.s
        batch, vocab = s.batch, s.vocab
        logits = self.randn(batch, vocab, dtype=torch.float32, scale=3.0)
        noise = torch.empty(batch, vocab, device=self.device).exponential_(generator=self.gen)
        rows = torch.arange(batch, device=self.device)
        temperature = torch.where(rows % 5 == 0, 0.0, 0.5 + (rows % 7) * 0.2)
        top_k = torch.where(rows % 3 == 0, 0, (rows * 37) % 2000 + 1).int()
        top_p = torch.where(rows % 4 == 0, 1.0, 0.3 + (rows % 6) * 0.1)
        got = sample(logits, temperature, top_k, top_p, noise)
        want = sample_ref(logits, temperature, top_k, top_p, noise)
        mismatches = (got != want).sum().item()
        self.checks.append({"kernel": "sample (token mismatches)", "rel_err": mismatches / batch, "max_abs_err": mismatches,
                            "tol": 1.0 / batch, "ok": mismatches == 0})  # fmt: skip
        nbytes = 2 * logits.numel() * 4
        t = torch.where(temperature > 0, temperature, 1.0)
        k = torch.where(top_k > 0, top_k, vocab).float()
        p = torch.where(top_p < 1, top_p, float("inf"))

        def torch_path():
            probs = apply_top_k_top_p(logits / t[:, None], k, p).softmax(-1)
            return torch.where(temperature > 0, (probs / noise).argmax(-1), logits.argmax(-1))

        base = self.time_ms(torch_path)
        for log2c in (2, 4):
            ms = self.time_ms(lambda: sample(logits, temperature, top_k, top_p, noise, log2_candidates=log2c))
            self.timing("sample top-k/p", f"{batch}x{vocab} cand={1 << log2c}", ms, nbytes, baseline_ms=base)
        greedy = torch.zeros_like(temperature)
        ms = self.time_ms(lambda: sample(logits, greedy, top_k, top_p, noise))
        self.timing("sample greedy", f"{batch}x{vocab}", ms, logits.numel() * 4)


def _meta(b):
    from stageserve.engine.attention import AttentionMetadata

    slots = torch.zeros(b.num_seqs, dtype=torch.int64, device=b.q.device)
    return AttentionMetadata(slots, b.block_tables, b.seq_lens, b.query_start_loc_host, b.seq_lens_host, b.max_seq_len)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs anywhere (CPU: Triton interpreter)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        if not args.smoke:
            print("gpu_kernels.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    _import_stageserve()
    import triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runner = Runner(SMOKE if args.smoke else Shapes(), device, args.smoke)
    started = time.perf_counter()
    runner.measure_copy()
    for section in (runner.attention, runner.elementwise, runner.sampling):
        section()
        print(f"[{section.__name__} done at {time.perf_counter() - started:.0f}s]", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\n{name} | torch {torch.__version__} | triton {triton.__version__} | copy {runner.copy_gbps:.0f} GB/s")
    print(f"\n{'check':34} {'rel_err':>10} {'max_abs':>10} {'tol':>9}  ok")
    for c in runner.checks:
        print(f"{c['kernel']:34} {c['rel_err']:10.2e} {c['max_abs_err']:10.2e} {c['tol']:9.1e}  {'yes' if c['ok'] else 'NO'}")
    print(f"\n{'kernel':20} {'shape':26} {'us':>9} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'base us':>9} {'speedup':>7}")
    for t in runner.timings:
        print(
            f"{t['kernel']:20} {t['shape']:26} {t['ms'] * 1e3:9.1f} {t['gb_s']:7.0f} {100 * t['frac_copy_bw']:6.1f} "
            f"{_fmt(t.get('tflop_s'), '8.1f')} {_fmt(t.get('baseline_ms') and t['baseline_ms'] * 1e3, '9.1f')} "
            f"{_fmt(t.get('speedup'), '7.2f')}"
        )
    failed = [c["kernel"] for c in runner.checks if not c["ok"]]
    print(f"\n{len(runner.checks) - len(failed)}/{len(runner.checks)} checks passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; {time.perf_counter() - started:.0f}s")  # fmt: skip
    if os.environ.get("OUT"):
        report = {
            "device": name, "torch": torch.__version__, "triton": triton.__version__, "smoke": args.smoke,
            "shapes": asdict(runner.s), "copy_gb_s": runner.copy_gbps, "checks": runner.checks, "timings": runner.timings,
        }  # fmt: skip
        path = Path(os.environ["OUT"]) / "gpu_kernels.json"
        path.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
