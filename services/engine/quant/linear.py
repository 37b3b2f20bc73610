"""Quantized linear layers behind one interface, chosen at load: `make_linear(in, out, bias, spec)`.

The model asks `make_linear` for every projection and hands each its weight through `load_linear`
(a float tensor, or a `PackedWeight` when a GGUF file's blocks were kept). What the layer keeps and
which kernel runs is decided by the `QuantSpec`:

    none   nn.Linear, the model's dtype
    int8   PackedLinear: per-channel INT8                     \
    int4   PackedLinear: asymmetric INT4, group 64/128 (+AWQ)  } one layout, kernels in stageserve.kernels.quant_matmul
    gguf   PackedLinear: Q4_0/Q4_1/Q8_0 blocks kept packed    /
    fp8    Fp8Linear: e4m3 weights and activations, torch._scaled_mm on Hopper

Per shape (batch rows M of the step), PackedLinear picks among the GEMV kernels (M <= 8: every weight
byte read once; the `tl` kernel's code planes or tiles dequantized into k order, and on the GPU the Gluon
kernel with explicit layouts), the tiled fused kernels (`mm`, and `mm_t` with the weight tile in the
MMA's rows), and dequantize + cuBLAS. With `quant_dispatch="tune"` (the
default) each layer times the candidates the first time it sees a batch bucket (next power of two of M)
and keeps the fastest; "fixed" uses the thresholds gemv_max_batch / fused_max_batch. With
`int4_layout="tiles"`, 4-bit weights with offsets are re-laid at load in the tensor cores' fragment order
(`quant_ref.tile_int4`, same bytes) and choose between `quant_mm_tiles`, on Hopper `quant_mm_wg_tiles`
(warpgroup MMA, batch 16 up), and dequantize + cuBLAS instead.
On the CPU (cpu_kernels.py) a few rows in bfloat16 take PyTorch's packed int4/int8 weight-only kernels
(the weights stay packed: decode reads fewer bytes); everything else is a dense matmul with the weight
dequantized once, in float32 the reference (`quant_cpu_kernels="reference"` keeps that for every call).

For tensor parallelism, a layer's weight is a `PackedWeight` (or dense tensor) that shards by rows or
group-aligned columns (`PackedWeight.narrow`), so a parallel linear can wrap `load_linear` with a shard.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from stageserve.common.errors import ModelLoadError
from stageserve.engine.quant.cpu_kernels import CpuPlan
from stageserve.engine.quant.formats import (
    PackedWeight,
    cat_rows,
    quantize_fp8,
    quantize_gguf,
    quantize_int4,
    quantize_int8,
)

logger = logging.getLogger(__name__)

METHODS = ("none", "int8", "int4", "fp8", "gguf")
PACKED_METHODS = ("int8", "int4", "gguf")  # the PackedLinear ones


@dataclass(frozen=True)
class QuantSpec:
    """What `make_linear` builds; derived from `EngineConfig` (see its fields for the meaning of each)."""

    method: str = "none"
    group_size: int = 128
    awq: bool = False
    fp8_scaling: str = "channel"  # "channel" (weights per row, activations per token) or "tensor"
    gguf_type: str = "q4_1"  # for float weights under "gguf"
    gemv_max_batch: int = 4
    fused_max_batch: int = 64
    dispatch: str = "tune"  # "tune" (time the candidates per batch bucket, once) or "fixed" (the thresholds)
    # (out, in, bits, group, batch bucket) -> kernel name, shared by the layers of one model so each shape is
    # timed once; not part of the spec's identity.
    choices: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    quantize_lm_head: bool = True
    tied_head_int8: bool = False  # a tied head (under a packed method) computes logits from an INT8 copy
    cpu_kernels: str = "auto"  # "auto" (PyTorch's packed kernels for small bf16 batches) or "reference"
    int4_layout: str = "rows"  # "rows" or "tiles" (4-bit weights with offsets, on CUDA)

    @classmethod
    def from_engine_config(cls, config, device: torch.device, dtype: torch.dtype) -> QuantSpec:
        """The spec for `config` on `device` in `dtype` (which resolve `tied_lm_head="auto"`)."""
        tied = config.tied_lm_head
        if tied == "auto":
            tied = "int8" if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else "embedding"
        return cls(
            method=config.quantization, group_size=config.quant_group_size, awq=config.quant_awq,
            fp8_scaling=config.fp8_scaling, gguf_type=config.gguf_quant_type,
            gemv_max_batch=config.quant_gemv_max_batch, fused_max_batch=config.quant_fused_max_batch,
            dispatch=config.quant_dispatch,
            quantize_lm_head=config.quantize_lm_head, cpu_kernels=config.quant_cpu_kernels,
            int4_layout=config.quant_int4_layout,
            tied_head_int8=config.quantize_lm_head and tied == "int8" and config.quantization in PACKED_METHODS,
        )  # fmt: skip


def int4_group(in_features: int, group_size: int) -> int:
    """The configured group, or the largest power-of-two fraction of it (>= 32) that divides in_features
    (SmolLM2's 576 takes group 64 under the default 128)."""
    group = group_size
    while in_features % group and group > 32:
        group //= 2
    if in_features % group:
        raise ModelLoadError(f"in_features {in_features} is not a multiple of 32, so no INT4 group fits")
    return group


class QuantizedLinear(nn.Module):
    """Base of the quantized layers: y = x W^T + b with W held in some compact form."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def load(self, weight: torch.Tensor | PackedWeight, device: torch.device) -> None:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out, in]: what the layer computes with (tests, AWQ search, eval)."""
        raise NotImplementedError

    def _finish(self, out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


class PackedLinear(QuantizedLinear):
    """INT8, INT4 and GGUF: integer codes with group scales/offsets, run by the dequantize-fused kernels."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec):
        super().__init__(in_features, out_features, bias, spec)
        self.packed: PackedWeight | None = None
        # AWQ: W was stored as W * s per input channel, so inputs are divided by s ([in] or None).
        self.input_scale: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None  # float weight kept until calibration (AWQ) quantizes it
        self._cpu: CpuPlan | None = None  # off CUDA: packed kernels or a dense matmul (cpu_kernels.py)
        self._table: tuple | None = None  # (the packed weight, its kernels by name, the fixed rule's GEMV): once per weight

    def quantize(self, weight: torch.Tensor) -> PackedWeight:
        method = self.spec.method
        if method == "int8":
            return quantize_int8(weight)
        if method == "int4":
            return quantize_int4(weight, int4_group(self.in_features, self.spec.group_size))
        return quantize_gguf(weight, self.spec.gguf_type)

    def load(self, weight, device):
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ModelLoadError(f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})")
        if isinstance(weight, PackedWeight):
            self.packed = self._laid_out(weight.to(device))
        elif self.spec.awq:
            self.pending = weight.to(device, torch.float32)
        else:
            self.packed = self._laid_out(self.quantize(weight.to(device)).to(device))

    def set_packed(self, packed: PackedWeight, input_scale: torch.Tensor | None) -> None:
        self.packed, self.input_scale, self.pending, self._cpu = self._laid_out(packed), input_scale, None, None

    def _laid_out(self, p: PackedWeight) -> PackedWeight:
        """The weight in the layout its kernels read: "tiles" where the spec asks for it and it fits (4-bit
        with offsets, on CUDA, whole 16 x 64 tiles), else as it came."""
        if self.spec.int4_layout != "tiles" or p.qweight.device.type != "cuda":
            return p
        from stageserve.kernels import quant_tiles as qtl

        return p.tiled() if qtl.tiles_supports(*p.shape, p.group_size, p.bits, p.offsets is not None) else p

    def weight_bytes(self) -> int:
        extra = 0 if self.input_scale is None else self.input_scale.numel() * self.input_scale.element_size()
        return self.packed.nbytes + extra

    def dequantized_weight(self) -> torch.Tensor:
        w = self.packed.dequantize()
        return w if self.input_scale is None else w * self.input_scale.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if self.pending is not None:  # calibration pass before quantization
            return self._finish((x2.float() @ self.pending.t()).to(x.dtype), shape)
        if self.input_scale is not None:
            x2 = x2 * self.input_scale
        p = self.packed
        if x.device.type != "cuda":
            if self._cpu is None or self._cpu.packed is not p:
                self._cpu = CpuPlan(p, self.spec.cpu_kernels, self.spec.gemv_max_batch)
            return self._finish(self._cpu(x2), shape)
        x2 = x2.contiguous()
        return self._finish(self._kernels()[self._pick(x2)](x2), shape)

    def _kernels(self) -> dict:
        """The kernels that can run this weight, by name (prefill runs eagerly, and every projection call asks)."""
        return self._kernel_table()[1]

    def _kernel_table(self) -> tuple:
        """(the packed weight, its kernels by name, the GEMV the fixed rule runs: the Gluon kernel's first
        configuration where it runs), built once per weight."""
        if self._table is not None and self._table[0] is self.packed:
            return self._table
        from stageserve.kernels import quant_matmul as qm

        p = self.packed
        if p.layout == "tiles":
            from stageserve.kernels import quant_tiles as qtl
            from stageserve.kernels.quant_tc_tiles import CONFIGS as TILE_CONFIGS

            kernels = {f"tc_{c.label()}": lambda x, c=c: qtl.quant_mm_tiles(x, p.qweight, p.scales, p.offsets, config=c)
                       for c in TILE_CONFIGS}  # fmt: skip
            if qtl.wg_tiles_supports(*p.shape, p.group_size, p.bits, True, p.qweight.device):  # Hopper: warpgroup MMA
                from stageserve.kernels.quant_wg_tiles import CONFIGS as WG_CONFIGS

                for c in WG_CONFIGS:
                    kernels[c.label()] = lambda x, c=c: qtl.quant_mm_wg_tiles(x, p.qweight, p.scales, p.offsets, config=c)
            kernels["dequant"] = lambda x: x @ qtl.dequantize_tiles(p.qweight, p.scales, p.offsets, x.dtype).t()
            self._table = (p, kernels, next(iter(kernels)))
            return self._table
        codes = qm.codes_fit(p.bits, p.group_size, p.offsets is not None)
        kernels = {
            "gemv": lambda x: qm.quant_gemv(x, p.qweight, p.scales, p.offsets, p.bits),
            "gemv_k": lambda x: qm.quant_gemv(x, p.qweight, p.scales, p.offsets, p.bits, k_order=True),
            "mm": lambda x: qm.quant_mm(x, p.qweight, p.scales, p.offsets, p.bits),
            # the weight tile in the MMA's rows (4-bit codes with the group scale after it), K split on narrow shapes
            "mm_t": lambda x: qm.quant_mm_t(x, p.qweight, p.scales, p.offsets, p.bits, codes=codes),
            "mm_t64": lambda x: qm.quant_mm_t(x, p.qweight, p.scales, p.offsets, p.bits, codes=codes, block_n=64, num_warps=4),
            # compute-bound: one dequantize pass, then the tensor-core GEMM
            "dequant": lambda x: x @ qm.dequantize(p.qweight, p.scales, p.offsets, p.bits, x.dtype).t(),
        }
        if p.shape[1] % 64 == 0:  # whole 64-deep K steps
            kernels["mm_k64"] = lambda x: qm.quant_mm(x, p.qweight, p.scales, p.offsets, p.bits, block_w=2 * p.bits)
        if qm.gluon_supports(p.qweight, p.scales, p.bits):
            from stageserve.kernels.quant_gemv_gluon import CONFIGS, TUNED

            for c in CONFIGS[:TUNED]:
                kernels[f"gemv_{c.label()}"] = lambda x, c=c: qm.quant_gemv_gluon(x, p.qweight, p.scales, p.offsets, p.bits, config=c)
        if qm.mm_gluon_supports(p.qweight, p.scales, p.offsets, p.bits):
            from stageserve.kernels.quant_mm_gluon import CONFIGS as MM_CONFIGS

            for c in MM_CONFIGS:
                kernels[f"mm_gluon_{c.label()}"] = lambda x, c=c: qm.quant_mm_gluon(x, p.qweight, p.scales, p.offsets, p.bits, config=c)
        self._table = (p, kernels, next((k for k in kernels if k.startswith("gemv_gluon")), "gemv"))
        return self._table

    def _pick(self, x: torch.Tensor) -> str:
        from stageserve.kernels.quant_matmul import GEMV_MAX_M

        m, spec, p = x.shape[0], self.spec, self.packed
        if p.layout == "tiles":  # warpgroup MMA from 16 rows where it runs (Hopper), else up to fused_max_batch
            kernels, first = self._kernel_table()[1:]
            wg = next((k for k in kernels if k.startswith("wg_")), None)
            if wg is not None and _fits(wg, x):
                fixed = wg
            else:
                fixed = first if m <= spec.fused_max_batch else "dequant"
        else:
            fused = "mm_t64" if p.bits == 4 else "mm"  # what the tuner kept most at batch 16-64 on an H100 (BENCHMARKS.md)
            fixed = self._kernel_table()[2] if m <= min(spec.gemv_max_batch, GEMV_MAX_M) else (fused if m <= spec.fused_max_batch else "dequant")
        key = (*p.shape, p.bits, p.group_size, p.layout, _bucket(m))
        return _choose(spec, key, fixed, lambda: {k: f for k, f in self._kernels().items() if _fits(k, x)}, x, "dequant")


def _fits(kernel: str, x: torch.Tensor) -> bool:
    """Whether a candidate kernel is worth timing for this input: GEMVs up to their batch, warpgroup MMA from
    one 16-column tile up, on bfloat16 (its x tiles are copied to shared memory as they are)."""
    from stageserve.kernels.quant_matmul import GEMV_MAX_M

    if kernel.startswith("gemv"):
        return x.shape[0] <= GEMV_MAX_M
    if kernel.startswith("wg_"):
        return x.shape[0] >= 16 and x.dtype == torch.bfloat16
    return True


class Fp8Linear(QuantizedLinear):
    """FP8 e4m3 weights and dynamically quantized activations.

    "channel": weight scales per output row and activation scales per token (rowwise _scaled_mm);
    "tensor": one scale each. On a GPU with FP8 tensor cores (sm_89+) the product runs in
    `torch._scaled_mm`; elsewhere the reference quantizes the same way and multiplies in float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec):
        super().__init__(in_features, out_features, bias, spec)
        self.weight_fp8: torch.Tensor | None = None  # [out, in] float8_e4m3fn
        self.weight_scale: torch.Tensor | None = None  # [out, 1] or [1, 1] float32
        self._scale_b: torch.Tensor | None = None  # the same as _scaled_mm takes it: [1, out] contiguous, or 0-dim
        self.per_row = spec.fp8_scaling == "channel"
        self._cpu_weight: torch.Tensor | None = None  # off the FP8 path: the dequantized weight, made once

    def load(self, weight, device):
        if isinstance(weight, PackedWeight):
            weight = weight.dequantize()
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ModelLoadError(f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})")
        q, scale = quantize_fp8(weight.to(device), self.per_row)
        self.weight_fp8, self.weight_scale = q.contiguous(), scale
        self._scale_b = scale.t().contiguous() if self.per_row else scale.reshape(())

    def weight_bytes(self) -> int:
        return self.weight_fp8.numel() + self.weight_scale.numel() * 4

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_fp8.float() * self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) >= (8, 9):
            return self._finish(self._fp8_product(x2.contiguous()), shape)
        xq, x_scale = quantize_fp8(x2, self.per_row)  # [M, K] e4m3, [M, 1] or [1, 1]
        if self._cpu_weight is None:
            self._cpu_weight = self.dequantized_weight()
        return self._finish(((xq.float() * x_scale) @ self._cpu_weight.t()).to(x.dtype), shape)

    def _fp8_product(self, x: torch.Tensor) -> torch.Tensor:
        """On FP8 tensor cores: activations quantized by one fused kernel (per token), then the GEMV for
        decode batches or `torch._scaled_mm`, whichever `_choose` finds faster for this shape. The GEMM
        accumulates in the tensor cores' fast mode, 7-14% faster at every batch on an H200 (benchmarks/quant.py
        sweep), at a small accuracy cost against the reference (quality is measured on the reference path)."""
        from stageserve.kernels.fp8 import GEMV_MAX_M, fp8_gemv, quantize_rows_fp8

        out_dtype = x.dtype if x.dtype != torch.float32 else torch.bfloat16
        if self.per_row:
            xq, x_scale = quantize_rows_fp8(x)
        else:
            xq, x_scale = quantize_fp8(x, False)
        kernels = {
            "scaled_mm": lambda _: torch._scaled_mm(
                xq, self.weight_fp8.t(), scale_a=x_scale if self.per_row else x_scale.reshape(()),
                scale_b=self._scale_b, out_dtype=out_dtype, use_fast_accum=True,
            ),  # fmt: skip
        }
        m = x.shape[0]
        if self.per_row and m <= GEMV_MAX_M:
            kernels["gemv"] = lambda _: fp8_gemv(xq, x_scale, self.weight_fp8, self.weight_scale, out_dtype)
        key = ("fp8", *self.weight_fp8.shape, self.per_row, _bucket(m))
        fixed = "gemv" if "gemv" in kernels and m <= self.spec.gemv_max_batch else "scaled_mm"
        return kernels[_choose(self.spec, key, fixed, lambda: kernels, x, "scaled_mm")](x).to(x.dtype)


def _bucket(m: int) -> int:
    """Batch rows rounded up to a power of two: layers time their kernels once per bucket."""
    return 1 << max(0, m - 1).bit_length()


def _choose(spec: QuantSpec, key: tuple, fixed: str, candidates, x: torch.Tensor, reference: str) -> str:
    """The kernel for this shape and batch bucket: timed once per key under dispatch "tune" (outside CUDA-graph
    capture, where nothing may sync), among the candidates that agree with `reference` on this x (`_agreeing`),
    else the fixed rule. `candidates()` maps names to callables of x."""
    if spec.dispatch != "tune" or torch.cuda.is_current_stream_capturing():
        return spec.choices.get(key, fixed)
    if key not in spec.choices:
        from stageserve.kernels._common import cuda_graph_time  # timed in a graph: no launch costs, as in decode

        times = {}
        for name, kernel in _agreeing(candidates(), x, reference, key).items():
            times[name] = cuda_graph_time(functools.partial(kernel, x))
        if not times:
            raise RuntimeError(f"no quantized kernel can run shape {key} on this GPU")
        spec.choices[key] = min(times, key=times.get)
    return spec.choices[key]


AGREEMENT_TOLERANCE = 2e-2  # relative L2 distance between two kernels' outputs for one weight and input


def _agreeing(candidates: dict, x: torch.Tensor, reference: str, key: tuple = ()) -> dict:
    """The candidates whose output on x is finite and within AGREEMENT_TOLERANCE of `reference`'s (relative L2).

    Kernels of one weight differ by rounding, ~1e-3 in bfloat16. A kernel that miscomputes on this GPU, through
    a compiler, driver or hardware difference its tests did not cover, is dropped with a warning instead of
    being kept for being fast. One that cannot launch here (shared memory, registers) is dropped quietly. If
    the reference's own output is not finite, the input decides nothing and every candidate that runs stays."""
    from triton.runtime.errors import OutOfResources

    ref = candidates[reference](x).float()
    ref_norm = ref.norm().item()
    kept = {reference: candidates[reference]}
    for name, kernel in candidates.items():
        if name == reference:
            continue
        try:
            out = kernel(x).float()
        except OutOfResources:
            continue
        err = (out - ref).norm().item() / max(ref_norm, 1e-30)
        if not math.isfinite(ref_norm) or (math.isfinite(err) and err <= AGREEMENT_TOLERANCE):
            kept[name] = kernel
        else:
            logger.warning("quantized kernel %s disagrees with %s on %s (relative error %.3g): not used", name, reference, key, err)
    return kept


def make_linear(in_features: int, out_features: int, bias: bool, spec: QuantSpec | None) -> nn.Module:
    """The projection layer for `spec`: nn.Linear when unquantized, else a QuantizedLinear."""
    method = "none" if spec is None else spec.method
    if method == "none":
        return nn.Linear(in_features, out_features, bias=bias)
    if method == "fp8":
        return Fp8Linear(in_features, out_features, bias, spec)
    if method in PACKED_METHODS:
        return PackedLinear(in_features, out_features, bias, spec)
    raise ValueError(f"unknown quantization {method!r} (known: {', '.join(METHODS)})")


@torch.no_grad()
def load_linear(module: nn.Module, weight: torch.Tensor | PackedWeight, name: str, device: torch.device) -> None:
    """Give a projection its [out, in] weight on `device`; kept GGUF blocks are dequantized for a dense layer."""
    if isinstance(module, QuantizedLinear):
        try:
            module.load(weight, device)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{name}: {exc}") from exc
        return
    if isinstance(weight, PackedWeight):
        weight = weight.dequantize()
    if module.weight.shape != weight.shape:
        raise ModelLoadError(f"{name}: shape {tuple(weight.shape)} != expected {tuple(module.weight.shape)}")
    module.weight.copy_(weight)


def cat_weights(parts: list[torch.Tensor | PackedWeight]) -> torch.Tensor | PackedWeight:
    """Fuse projections along their output rows; packed parts stay packed when their layouts match."""
    if not any(isinstance(p, PackedWeight) for p in parts):
        return torch.cat(parts)
    if all(isinstance(p, PackedWeight) for p in parts):
        fused = cat_rows(parts)
        if fused is not None:
            return fused
    return torch.cat([p.dequantize() if isinstance(p, PackedWeight) else p.float() for p in parts])


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by every projection's weight (and scales), quantized or not; tied weights counted once."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.weight_bytes()
        elif isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel() * module.weight.element_size()
    return total
