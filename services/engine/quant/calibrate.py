"""Calibration at load: one forward pass of a small fixed text through the float model, which gives

  - AWQ-style INT4 (Lin et al., 2023): per input channel s = mean|x|^alpha, alpha searched on a grid per
    layer to minimise the output error of (W s)_q (x / s) against W x on the calibration activations,
    then per (row, group) the range of W s shrunk by the ratio (1.0 .. 0.7) with the least output error
    (AWQ's clipping search);
  - FP8 KV-cache scales: per layer, the largest |k| and |v| seen, with 2x headroom, over 448.

The pass runs before any weight is quantized (AWQ layers hold their float weight as `pending`
until `finalize_awq`), on a throwaway KV cache.
"""

from __future__ import annotations

from importlib import resources

import torch

from stageserve.engine.attention import AttentionMetadata, TorchAttention
from stageserve.engine.quant.formats import FP8_MAX, PackedWeight, int4_codes, int4_grid, int4_packed, quantize_int4
from stageserve.engine.quant.linear import PackedLinear, int4_group

CALIBRATION_TOKENS = 512
AWQ_GRID = 11  # alpha in 0, 0.1, ..., 1; alpha 0 is plain INT4, so the search never does worse on its data
AWQ_SAMPLE_ROWS = 256
AWQ_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # 1.0 first: plain min-max where nothing is better
KV_HEADROOM = 2.0


def calibration_text() -> str:
    return resources.files("stageserve.engine.quant").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def calibration_token_ids(tokenizer, vocab_size: int, n: int = CALIBRATION_TOKENS) -> list[int]:
    """The calibration text's tokens, or fixed-seed random ids for a model without a tokenizer (dummy)."""
    if tokenizer is not None:
        return tokenizer.encode(calibration_text())[:n]
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()


@torch.inference_mode()
def prefill_hidden(model, token_ids: list[int], *, block_size: int = 16, kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One causal pass of a single sequence over a fresh cache (of `kv_dtype`, default the model's): [len, hidden]."""
    device, dtype = model.embed_tokens.weight.device, kv_dtype or model.embed_tokens.weight.dtype
    cfg, n = model.config, len(token_ids)
    num_blocks = -(-n // block_size)
    caches = [
        torch.zeros(2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
        for _ in range(cfg.num_layers)
    ]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        block_tables=torch.arange(num_blocks, device=device).unsqueeze(0),
        seq_lens=torch.tensor([n], device=device),
        query_start_loc=[0, n],
        seq_lens_host=[n],
        max_seq_len=n,
    )
    ids = torch.tensor(token_ids, device=device)
    return model(ids, torch.arange(n, device=device), caches, meta)


class _RecordingAttention(TorchAttention):
    """Torch attention that notes each call's (max |k|, max |v|): one call per layer, in order."""

    def __init__(self):
        self.amax: list[tuple[float, float]] = []

    def forward(self, q, k, v, kv_cache, meta, scale, kv_scale=None):
        self.amax.append((k.abs().max().item(), v.abs().max().item()))
        return super().forward(q, k, v, kv_cache, meta, scale)


@torch.inference_mode()
def calibrate(model, token_ids: list[int], *, kv_scales: bool) -> None:
    """Run the calibration pass; quantize pending AWQ layers and/or set every layer's fp8 KV scales."""
    pending = [m for m in model.modules() if isinstance(m, PackedLinear) and m.pending is not None]
    samples: dict[PackedLinear, torch.Tensor] = {}

    def grab(module, args):
        samples[module] = sample_rows(args[0].reshape(-1, module.in_features).float())

    hooks = [m.register_forward_pre_hook(grab) for m in pending]
    recorder = _RecordingAttention()
    attns = [layer.self_attn for layer in model.layers]
    backends = [a.backend for a in attns]
    for a in attns:
        a.backend, a.kv_scale = recorder, None
    try:
        prefill_hidden(model, token_ids)
    finally:
        for h in hooks:
            h.remove()
        for a, b in zip(attns, backends):
            a.backend = b
    for module in pending:
        group = int4_group(module.in_features, module.spec.group_size)
        packed, input_scale = search_awq(module.pending, samples[module], group)
        module.set_packed(packed, input_scale.to(model.embed_tokens.weight.dtype))
    if kv_scales:
        for a, (k_amax, v_amax) in zip(attns, recorder.amax):
            a.kv_scale = (max(k_amax, 1e-6) * KV_HEADROOM / FP8_MAX, max(v_amax, 1e-6) * KV_HEADROOM / FP8_MAX)


def sample_rows(x: torch.Tensor) -> torch.Tensor:
    """Up to AWQ_SAMPLE_ROWS rows of x [S, K], evenly spaced: the activations the AWQ searches score on."""
    return x[:: max(1, x.shape[0] // AWQ_SAMPLE_ROWS)][:AWQ_SAMPLE_ROWS]


def search_awq(weight: torch.Tensor, x: torch.Tensor, group_size: int, *, clip: bool = True):
    """Best per-input-channel scale s for INT4 of `weight` [N, K] given activations x [S, K], then (with
    `clip`) the best clipping of each group of W s.

    Returns (PackedWeight of W * s, 1 / s [K]); the layer multiplies its input by 1 / s.
    """
    weight = weight.float()
    ref = x @ weight.t()  # [S, N]
    act = x.abs().mean(dim=0).clamp_min(1e-6)  # [K]
    error = lambda packed, s: ((x / s) @ packed.dequantize().t() - ref).pow(2).mean().item()  # noqa: E731
    best = None
    for i in range(AWQ_GRID):
        s = act.pow(i / (AWQ_GRID - 1))
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
        packed = quantize_int4(weight * s, group_size)
        err = error(packed, s)
        if best is None or err < best[0]:
            best = (err, packed, s)
    err, packed, s = best
    if clip:
        clipped = clip_int4(weight * s, x / s, group_size)
        # Groups are chosen one by one, so the layer's error (which sums over groups) is checked as a whole.
        if error(clipped, s) < err:
            packed = clipped
    return packed, 1 / s


def clip_int4(weight: torch.Tensor, x: torch.Tensor, group_size: int, rows_per_chunk: int = 2048) -> PackedWeight:
    """INT4 of `weight` [N, K] with each (row, group)'s range shrunk by the ratio in AWQ_CLIP_RATIOS whose
    output error on that group's share of x [S, K] is least: an outlier weight is clipped when the
    finer steps it buys the rest of its group are worth more. Rows go in chunks (the errors are [S, rows, groups])."""
    n, k = weight.shape
    xg = x.reshape(-1, k // group_size, group_size)
    chunks = [_clip_rows(weight[r : r + rows_per_chunk].reshape(-1, k // group_size, group_size), xg)
              for r in range(0, n, rows_per_chunk)]  # fmt: skip
    return int4_packed(*(torch.cat(parts) for parts in zip(*chunks)))


def _clip_rows(wg: torch.Tensor, xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales, offsets) of weight groups wg [R, G, group] clipped for activations xg [S, G, group]."""
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    best = None
    for ratio in AWQ_CLIP_RATIOS:
        scale, offset = int4_grid(lo * ratio, hi * ratio)
        q = int4_codes(wg, scale[..., None], offset[..., None])
        err = torch.einsum("sgi,rgi->srg", xg, q * scale[..., None] + offset[..., None] - wg).pow(2).sum(0)  # [R, G]
        if best is None:
            best = [err, q, scale, offset]
            continue
        better = err < best[0]
        best = [torch.where(better, err, best[0]), torch.where(better[..., None], q, best[1]),
                torch.where(better, scale, best[2]), torch.where(better, offset, best[3])]  # fmt: skip
    return best[1], best[2], best[3]
