"""What a quantized GEMV compiles to on Hopper, without a GPU: instruction mix of its main loop, load widths,
layout conversions, registers. Triton compiles for sm_90a here (its bundled ptxas and nvdisasm), so a kernel
change can be judged by its SASS before it costs device time.

    python benchmarks/kernel_sass.py                       # int4 g128 and int8, both GEMV forms, batch 1
    python benchmarks/kernel_sass.py --gluon               # the Gluon GEMV (batch 1, 2), 4-bit tensor-core kernels (8, 16)
    python benchmarks/kernel_sass.py --bits 4 --block-n 8 --block-w 128 --dump /tmp/sass

Per variant: instructions in the hottest loop and per code (weight element) it handles, global loads by
width (a 32-bit LDG per word against a 128-bit one per four), and the opcode counts of the loop body.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from stageserve.kernels import quant_matmul as qm

SIGNATURE = {
    "x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "o_ptr": "*fp16", "out_ptr": "*bf16",
    "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_om": "i32",
}  # fmt: skip
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_gemv(bits: int, block_n: int, block_w: int, form: str, num_warps: int):
    constexprs = {"BITS": bits, "GROUP": 128, "PER_CHANNEL": bits == 8, "HAS_OFFSET": bits == 4, "BLOCK_M": 1,
                  "BLOCK_N": block_n, "BLOCK_W": block_w, "K_ORDER": form == "korder"}  # fmt: skip
    signature = SIGNATURE | {name: "constexpr" for name in constexprs}
    src = ASTSource(fn=qm._quant_gemv_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def compile_gluon(bits: int, block_m: int, config):
    from triton.experimental.gluon._runtime import GluonASTSource

    from stageserve.kernels import quant_gemv_gluon as qg

    constexprs = {"BITS": bits, "GROUP": 128, "PER_CHANNEL": bits == 8, "HAS_OFFSET": bits == 4, "BLOCK_M": block_m,
                  "RPT": config.rows_per_thread, "TN": config.threads_n, "BLOCK_C": config.chunks_per_step, "EVEN_C": True}  # fmt: skip
    signature = SIGNATURE | {"code_mask": "i32"} | {name: "constexpr" for name in constexprs}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 8, 9)}  # pointers and row strides, as launched
    src = GluonASTSource(fn=qg._quant_gemv_gluon_kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})


def compile_gluon_mm(group: int, block_mb: int, config, tiles: bool = False):
    """quant_mm_gluon's kernel, or with `tiles` quant_tc_tiles's (the weights in the tile layout)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from stageserve.kernels import quant_mm_gluon as qmg, quant_tc_tiles as qt

    module, kernel = (qt, qt._tc_tiles_kernel) if tiles else (qmg, qmg._quant_mm_gluon_kernel)
    constexprs = {"GROUP": group, "BLOCK_N": config.block_n, "BLOCK_MB": block_mb, "BLOCK_K": module.step_k(group)}
    if tiles:
        constexprs["PREFETCH"] = config.prefetch
    signature = SIGNATURE | {"steps_per_split": "i32", "stride_split": "i32"} | {name: "constexpr" for name in constexprs}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 7, 8, 9)}  # pointers, K, row strides
    src = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})


def hottest_loop(sass: list[str]) -> list[str]:
    """The longest span between a label and a backward branch to it."""
    labels = {m.group(1): i for i, line in enumerate(sass) if (m := re.match(r"^\s*\.(L_x_\d+):", line))}
    best: list[str] = []
    for i, line in enumerate(sass):
        m = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i and i - labels[m.group(1)] > len(best):
            best = sass[labels[m.group(1)] : i + 1]
    return best


def opcodes(lines: list[str]) -> collections.Counter:
    ops = collections.Counter()
    for line in lines:
        m = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


def report(name: str, kernel, codes_per_iteration: int, dump: Path | None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:  # nvdisasm wants a file it can seek
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(TOOLS / "nvdisasm"), "-c", cubin.name], capture_output=True, check=True, text=True).stdout.splitlines()
    loop = hottest_loop(sass)
    ops = opcodes(loop)
    loads = {op: n for op, n in ops.items() if op.startswith("LDG")}
    ptxas = subprocess.run([str(TOOLS / "ptxas-blackwell"), "-arch=sm_90a", "-v", "-o", "/dev/null", "-"],
                           input=kernel.asm["ptx"].encode(), capture_output=True).stderr.decode()  # fmt: skip
    regs = re.search(r"Used (\d+) registers", ptxas)
    base = {op.split(".")[0] for op in ops}
    row = {
        "variant": name,
        "loop_instructions": sum(ops.values()),
        "per_code": round(sum(ops.values()) / codes_per_iteration, 2),
        "registers": int(regs.group(1)) if regs else None,
        "spills": "spill" in ptxas and not re.search(r"0 bytes spill stores, 0 bytes spill loads", ptxas),
        "convert_layout": kernel.asm["ttgir"].count("convert_layout"),
        "loads": loads,
        "top_ops": dict(collections.Counter({b: sum(n for op, n in ops.items() if op.split(".")[0] == b) for b in base}).most_common(10)),
    }
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.sass").write_text("\n".join(sass))
        (dump / f"{name}.ttgir").write_text(kernel.asm["ttgir"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--block-n", type=int, default=8, help="rows per program (the engine's choice for 8B shapes on an H200)")
    ap.add_argument("--block-w", type=int, default=128, help="words per row per step")
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--dump", type=Path, default=None, help="also write each variant's SASS and TTGIR here")
    ap.add_argument("--gluon", action="store_true", help="the Gluon GEMV at its first launch configuration instead")
    args = ap.parse_args()
    if args.gluon:
        from stageserve.kernels.quant_gemv_gluon import CONFIGS

        c = CONFIGS[0]
        for bits in args.bits:
            for block_m in (1, 2):
                codes = c.rows_per_thread * (c.chunks_per_step * c.threads_n // 32) * (128 // bits)  # per thread per iteration
                print(report(f"gluon_int{bits}_m{block_m}_{c.label()}", compile_gluon(bits, block_m, c), codes, args.dump), flush=True)
        from stageserve.kernels.quant_mm_gluon import CONFIGS as TC

        for group in (128, 32):  # INT4 g128, Q4_0/Q4_1
            tc = TC[0]
            codes = tc.block_n * min(group, 128) // (32 * tc.num_warps)
            print(report(f"tc_g{group}_mb16_{tc.label()}", compile_gluon_mm(group, 16, tc), codes, args.dump), flush=True)
        from stageserve.kernels.quant_tc_tiles import CONFIGS as TILES

        for tiles in TILES[:2] + TILES[7:9]:  # the tile layout (INT4 g128), batch 1 (padded to 8) and 16; prefetch 1 and 2
            codes = tiles.block_n * 128 // (32 * tiles.num_warps)
            for block_mb in (8, 16):
                print(report(f"tiles_g128_mb{block_mb}_{tiles.label()}", compile_gluon_mm(128, block_mb, tiles, tiles=True), codes, args.dump), flush=True)
        return
    for bits in args.bits:
        for form in ("planes", "korder"):
            kernel = compile_gemv(bits, args.block_n, args.block_w, form, args.num_warps)
            codes = args.block_n * args.block_w * (32 // bits) // (32 * args.num_warps)  # per thread per iteration
            name = f"int{bits}_{form}_n{args.block_n}_w{args.block_w}"
            print(report(name, kernel, codes, args.dump), flush=True)


if __name__ == "__main__":
    main()
