"""copy_blocks (the cuda-ipc transport's copy) against its torch reference, with poisoned destinations."""

from __future__ import annotations

import pytest
import torch

from stageserve.kernels.block_copy import copy_blocks, copy_blocks_ref


def pools(device, gen, dtype, layers, src_blocks, dst_blocks, block_size, heads, dim):
    src = torch.randn(layers, 2, src_blocks, block_size, heads, dim, generator=gen, device=device).to(dtype)
    dst = torch.full((layers, 2, dst_blocks, block_size, heads, dim), float("nan"), dtype=dtype, device=device)
    return src, dst


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size, heads, dim", [(16, 2, 64), (4, 1, 128), (8, 3, 80)])
def test_copy_blocks_matches_the_reference_and_touches_nothing_else(device, gen, dtype, block_size, heads, dim):
    src, dst = pools(device, gen, dtype, 3, 12, 20, block_size, heads, dim)
    perm = torch.randperm(20, generator=gen, device=gen.device)
    src_ids = torch.tensor([11, 0, 5, 7, 3], device=device)
    dst_ids = perm[:5].to(device)
    expected = dst.clone()
    copy_blocks_ref(src, expected, src_ids, dst_ids)
    copy_blocks(src, dst, src_ids, dst_ids)
    assert torch.equal(dst.isnan(), expected.isnan())  # untouched blocks still poisoned
    assert torch.equal(dst.nan_to_num(), expected.nan_to_num())


def test_one_layer_views_and_an_empty_copy(device, gen):
    src, dst = pools(device, gen, torch.bfloat16, 2, 6, 6, 16, 2, 64)
    ids = torch.tensor([4, 1], device=device)
    copy_blocks(src[1], dst[1], ids, ids.flip(0))  # a 5-dim layer view of contiguous pools
    assert torch.equal(dst[1, :, 1], src[1, :, 4]) and torch.equal(dst[1, :, 4], src[1, :, 1])
    assert dst[0].isnan().all()
    copy_blocks(src, dst, ids[:0], ids[:0])


@pytest.mark.gpu
def test_copy_blocks_past_2_to_the_31_elements(device, gen):
    # llama-3-8b's pool layout: 32 layers, 8 heads of 128, block 16; 2,100 blocks pass 2**31 elements.
    src = torch.randn(32, 2, 2100, 16, 8, 128, device=device, dtype=torch.bfloat16)
    dst = torch.zeros(32, 2, 2100, 16, 8, 128, device=device, dtype=torch.bfloat16)
    ids = torch.tensor([2099, 0, 1500], device=device)
    copy_blocks(src, dst, ids, ids.flip(0))  # 2099 -> 1500, 0 -> 0, 1500 -> 2099
    assert torch.equal(dst[:, :, 1500], src[:, :, 2099]) and torch.equal(dst[:, :, 2099], src[:, :, 1500])
    assert torch.equal(dst[:, :, 0], src[:, :, 0]) and not dst[:, :, 1].any()
