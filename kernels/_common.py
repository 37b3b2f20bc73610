"""Checks and small helpers shared by the kernel wrappers.

Every wrapper asserts what its kernel assumes (shapes, strides, dtypes, one device) before launching,
because a Triton kernel given a wrong stride or dtype reads garbage instead of failing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on the CPU through numpy (tests on CPU-only machines)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def gemv_block_n(n: int, sms: int) -> int:
    """Output rows per program of a GEMV that streams each row once: about 4 programs per SM, so enough
    loads stay in flight, and 2..8 rows."""
    return max(2, min(8, 1 << max(0, (n // (4 * sms)).bit_length() - 1)))


def cuda_graph_time(fn, calls: int = 10, replays: int = 5) -> float:
    """Median GPU seconds per `fn()`: `calls` calls captured in one CUDA graph, replayed. Host launch costs
    (tens of microseconds for a Triton launch, more than a small kernel runs) are not counted, as they are
    not in a CUDA-graph decode step; timing single eager calls would pick kernels by launch overhead."""
    fn()  # compiles, and warms the allocator for the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # the first replay uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def check_tensor(
    t: torch.Tensor,
    name: str,
    *,
    shape: tuple[int | None, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
    last_dim_contiguous: bool = True,
) -> None:
    """Assert the properties a kernel relies on. `None` in `shape` means any size along that dim."""
    assert isinstance(t, torch.Tensor), f"{name}: expected a tensor, got {type(t).__name__}"
    if shape is not None:
        assert t.dim() == len(shape), f"{name}: expected {len(shape)} dims, got shape {tuple(t.shape)}"
        for dim, (want, got) in enumerate(zip(shape, t.shape)):
            assert want is None or want == got, f"{name}: dim {dim} is {got}, expected {want} (shape {tuple(t.shape)})"
    if dtypes is not None:
        assert t.dtype in dtypes, f"{name}: dtype {t.dtype} not in {dtypes}"
    if device is not None:
        assert t.device == device, f"{name}: on {t.device}, expected {device}"
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1:
        assert t.stride(-1) == 1, f"{name}: last dim must be contiguous, strides {t.stride()}"


def check_launch_device(device: torch.device) -> None:
    """Kernels run on CUDA, or anywhere under the interpreter."""
    assert device.type == "cuda" or interpreting(), f"Triton kernels need a CUDA tensor (got {device}); set TRITON_INTERPRET=1 for CPU"


def gluon_capable(device: torch.device) -> bool:
    """Gluon kernels need a CUDA device (they have no interpreter) of compute capability 8.0 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def wgmma_capable(device: torch.device) -> bool:
    """Warpgroup MMA (wgmma) needs a Hopper GPU: compute capability 9.0 exactly (sm_90a)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; a nominal 132 (H100 SXM) under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs for `mma`: exact float32 products for float32 inputs (tf32 would cost ~3e-4 relative error),
    and bf16 operands widened under the interpreter, whose bf16 dot multiplies raw bit patterns (Triton 3.9)."""
    return {
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "DOT_UPCAST": interpreting() and dtype == torch.bfloat16,
    }


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """a @ b with a float32 result."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


# Triton 3.9's interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even; under the
# interpreter `cast_to` rounds by hand so CPU tests see GPU rounding. A constant fixed at import, like
# TRITON_INTERPRET itself (read when the kernels are decorated).
_EMULATE_BF16_RTNE = tl.constexpr(interpreting())


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even on the GPU and under the interpreter alike."""
    if _EMULATE_BF16_RTNE and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)
