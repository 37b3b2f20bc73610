"""Copy KV blocks between two pools by block id in one pass: `dst[..., d_i, :] = src[..., s_i, :]`.

The cuda-ipc transport's copy (prefill's pool into decode's, mapped). In both pools one block of one
layer's K or V is a contiguous run of `block_size * kv_heads * head_dim` elements, so each program
copies a slice of one run: the bytes are read once and written once, where the torch reference
(`index_select` then `index_copy_`) reads and writes them twice through a temporary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stageserve.kernels._common import FLOAT_DTYPES, check_launch_device, interpreting


def copy_blocks_ref(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """The same copy in torch: one gather and one scatter along the block dim (dim -4)."""
    dim = src.dim() - 4
    dst.index_copy_(dim, dst_ids, src.index_select(dim, src_ids))


@triton.jit
def _copy_blocks_kernel(
    src_ptr,  # [layers, 2, src_blocks, block_size, kv_heads, head_dim], contiguous
    dst_ptr,  # [layers, 2, dst_blocks, block_size, kv_heads, head_dim], contiguous
    src_ids_ptr, dst_ids_ptr,  # [n] int64
    src_blocks, dst_blocks,  # blocks per layer and K/V in each pool
    block_elems,  # block_size * kv_heads * head_dim
    BLOCK: tl.constexpr,
):  # fmt: skip
    pair = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)  # layer * 2 + (0: K, 1: V)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < block_elems
    s = tl.load(src_ids_ptr + pair).to(tl.int64)
    d = tl.load(dst_ids_ptr + pair).to(tl.int64)
    # int64 throughout: an 8B model's pool passes 2**31 elements.
    src = src_ptr + (plane * src_blocks + s) * block_elems
    dst = dst_ptr + (plane * dst_blocks + d) * block_elems
    tl.store(dst + offs, tl.load(src + offs, mask=ok), mask=ok)


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """src `[layers, 2, Ns, block_size, kv_heads, head_dim]` (or without `layers`) into dst (`Nd` blocks).

    Ids are not range-checked here (that would need a device sync): the caller validated them against
    both pools' sizes.
    """
    device = src.device
    check_launch_device(device)
    if src.dim() == 5:
        src, dst = src.unsqueeze(0), dst.unsqueeze(0)
    assert src.dim() == 6 and dst.dim() == 6, f"pools must be 5- or 6-dim, got {tuple(src.shape)}"
    assert src.shape[:2] == dst.shape[:2] and src.shape[3:] == dst.shape[3:], f"{tuple(src.shape)} vs {tuple(dst.shape)}"
    assert src.dtype == dst.dtype and src.dtype in FLOAT_DTYPES, f"dtypes {src.dtype} / {dst.dtype}"
    assert src.is_contiguous() and dst.is_contiguous(), "pools must be contiguous"
    assert dst.device == device and src_ids.device == device and dst_ids.device == device, "one device"
    assert src_ids.dtype == dst_ids.dtype == torch.int64 and src_ids.shape == dst_ids.shape and src_ids.dim() == 1
    n = src_ids.numel()
    if n == 0:
        return
    block_elems = src[0, 0, 0].numel()
    block = 256 if interpreting() else 4096
    grid = (n, src.shape[0] * 2, triton.cdiv(block_elems, block))
    _copy_blocks_kernel[grid](
        src, dst, src_ids, dst_ids, src.shape[2], dst.shape[2], block_elems, BLOCK=block,
        num_warps=1 if interpreting() else 8,
    )
