"""Quantized weights on the CPU: format round trips, GGUF blocks repacked bit-exactly and kept packed by the
loader, sharding, AWQ, FP8, and the quantized layers inside the engine (reference path)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from stageserve.common.errors import InvalidArgumentError
from stageserve.engine.attention import FP8_KV_DTYPE, dequant_kv, write_kv
from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.engine.loader.weights import load_model
from stageserve.engine.quant.calibrate import clip_int4, search_awq
from stageserve.engine.quant.formats import (
    PackedWeight,
    cat_rows,
    quantize_fp8,
    quantize_gguf,
    quantize_int4,
    quantize_int8,
    repack_gguf,
)
from stageserve.engine.quant.linear import Fp8Linear, PackedLinear, QuantSpec, _agreeing, _fits, cat_weights, make_linear
from stageserve.sample.params import SamplingParams

Q = gguf.GGMLQuantizationType
GGUF_FORMATS = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def weight(n: int = 48, k: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_repacked_gguf_blocks_dequantize_bit_exactly(fmt):
    w = weight().numpy()
    raw = gguf.quants.quantize(w, GGUF_FORMATS[fmt])  # [N, bytes]
    packed = repack_gguf(raw, fmt, w.shape[1])
    assert packed.fmt == fmt and packed.shape == w.shape and packed.group_size == 32
    expected = gguf.quants.dequantize(raw, GGUF_FORMATS[fmt]).reshape(w.shape)
    np.testing.assert_array_equal(packed.dequantize().numpy(), expected)


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_our_gguf_quantizer_matches_ggml(fmt):
    w = weight()
    ours = quantize_gguf(w, fmt).dequantize().numpy()
    raw = gguf.quants.quantize(w.numpy(), GGUF_FORMATS[fmt])
    theirs = gguf.quants.dequantize(raw, GGUF_FORMATS[fmt]).reshape(w.shape)
    # Same rounding rules; the only differences are float32 vs numpy rounding of 1/d at ties.
    assert np.mean(ours == theirs) > 0.995
    assert np.abs(ours - theirs).max() <= 0.05 * np.abs(w.numpy()).max() / 7


def test_int8_round_trip_is_within_half_a_step():
    w = weight()
    p = quantize_int8(w)
    assert p.qweight.dtype == torch.int8 and p.scales.shape == (48, 1) and p.offsets is None
    err = (p.dequantize() - w).abs()
    assert (err <= p.scales / 2 + 1e-7).all()


@pytest.mark.parametrize("group", [64, 128])
def test_int4_round_trip_is_within_half_a_step(group):
    w = weight() + 0.02  # off-centre: the zero point must do work
    p = quantize_int4(w, group)
    assert p.qweight.shape == (48, 128) and p.scales.shape == (48, 256 // group) and p.group_size == group
    step = p.scales.float().repeat_interleave(group, dim=1)
    err = (p.dequantize() - w).abs()
    assert (err <= step / 2 + 2e-3 * step + 1e-6).all()  # + fp16 rounding of the offset
    assert p.nbytes == 48 * 128 + 2 * 2 * 48 * (256 // group)


def test_int4_rejects_a_group_that_does_not_divide():
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(weight(k=96), 64)


@pytest.mark.parametrize("per_row", [True, False])
def test_fp8_round_trip_keeps_three_mantissa_bits(per_row):
    x = weight()
    q, scale = quantize_fp8(x, per_row)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == ((48, 1) if per_row else (1, 1))
    back = q.float() * scale
    normal = x.abs() > scale * 2**-6 * 4  # away from the subnormal range
    assert ((back - x).abs()[normal] <= x.abs()[normal] / 16 + 1e-9).all()
    assert (back.abs().amax(dim=1 if per_row else None) <= x.abs().amax(dim=1 if per_row else None) * 1.0001).all()


def test_shards_by_rows_and_group_aligned_columns():
    p = quantize_int4(weight(k=256), 64)
    full = p.dequantize()
    assert torch.equal(p.narrow(0, 8, 16).dequantize(), full[8:24])
    assert torch.equal(p.narrow(1, 128, 128).dequantize(), full[:, 128:])
    with pytest.raises(ValueError, match="group boundaries"):
        p.narrow(1, 32, 64)
    with pytest.raises(ValueError, match="per-channel"):
        quantize_int8(weight()).narrow(1, 0, 128)


def test_fused_projections_stay_packed_when_layouts_match():
    a, b = quantize_gguf(weight(seed=1), "q4_1"), quantize_gguf(weight(seed=2), "q4_0")
    fused = cat_rows([a, b])
    assert fused is not None and fused.fmt == "mixed"
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    mixed = cat_weights([a, quantize_gguf(weight(seed=3), "q8_0")])  # 4-bit + 8-bit: falls back to float
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (96, 256)


def test_awq_is_never_worse_than_plain_int4_on_its_calibration_data():
    gen = torch.Generator().manual_seed(0)
    w = weight()
    loud = torch.ones(256)
    loud[::32] = 20.0  # a few outlier input channels, as LLM activations have
    x = torch.randn(64, 256, generator=gen) * loud
    packed, inv_scale = search_awq(w, x, 64)
    ref = x @ w.t()
    awq_err = ((x * inv_scale) @ packed.dequantize().t() - ref).pow(2).mean()
    plain_err = (x @ quantize_int4(w, 64).dequantize().t() - ref).pow(2).mean()
    assert awq_err <= plain_err
    assert awq_err < 0.9 * plain_err  # with skewed activations the search finds a real gain


def test_awq_clipping_lowers_the_error_where_a_group_has_an_outlier_weight():
    gen = torch.Generator().manual_seed(1)
    w = weight(k=128)
    w[:, ::64] *= 6  # one large weight per group stretches min-max's range
    x = torch.randn(64, 128, generator=gen)
    ref = x @ w.t()
    err = lambda packed: (x @ packed.dequantize().t() - ref).pow(2).mean()  # noqa: E731
    clipped = clip_int4(w, x, 64)
    assert clipped.shape == w.shape and clipped.group_size == 64
    assert err(clipped) < 0.9 * err(quantize_int4(w, 64))
    # Rows go in chunks; the result does not depend on the chunk size.
    assert torch.equal(clip_int4(w, x, 64, rows_per_chunk=5).qweight, clipped.qweight)
    scaled, inv = search_awq(w, x, 64)
    unclipped, inv_unclipped = search_awq(w, x, 64, clip=False)
    awq_err = lambda packed, inv: ((x * inv) @ packed.dequantize().t() - ref).pow(2).mean()  # noqa: E731
    assert torch.equal(inv, inv_unclipped) and awq_err(scaled, inv) <= awq_err(unclipped, inv)


@pytest.mark.parametrize("method", ["int8", "int4", "gguf", "fp8"])
def test_quantized_layers_compute_with_their_dequantized_weight(method):
    spec = QuantSpec(method=method, group_size=64)
    layer = make_linear(256, 48, True, spec)
    assert isinstance(layer, Fp8Linear if method == "fp8" else PackedLinear)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(48))
    layer.load(weight(), torch.device("cpu"))
    x = torch.randn(2, 3, 256)
    out = layer(x)
    assert out.shape == (2, 3, 48)
    if method == "fp8":
        xq, xs = quantize_fp8(x.reshape(6, 256), True)
        expected = (xq.float() * xs) @ layer.dequantized_weight().t() + layer.bias
    else:
        expected = x.reshape(6, 256) @ layer.dequantized_weight().t() + layer.bias
    torch.testing.assert_close(out.reshape(6, 48), expected, rtol=1e-5, atol=1e-5)
    bound = {"int8": 1 / 200, "int4": 1 / 14, "gguf": 1 / 14, "fp8": 1 / 16}[method]  # of the largest |w|
    assert (layer.dequantized_weight() - weight()).abs().max() < bound * weight().abs().max()


@pytest.mark.parametrize(
    ("method", "gguf_type", "packed_ok"),
    [("int8", "q4_1", True), ("int4", "q4_1", True), ("gguf", "q4_0", True), ("gguf", "q4_1", True), ("gguf", "q8_0", False)],
)
def test_cpu_layers_take_packed_kernels_for_few_bf16_rows_and_agree_with_the_reference(method, gguf_type, packed_ok):
    """On the CPU, bfloat16 batches of up to gemv_max_batch rows run PyTorch's packed int4/int8 kernels where
    the format fits (Q8_0's grouped bytes do not); larger batches, float32 inputs and `reference` take the
    dense matmul. Every path computes with the layer's dequantized weight."""
    spec = QuantSpec(method=method, group_size=64, gguf_type=gguf_type, gemv_max_batch=4)
    layer = make_linear(256, 48, False, spec)
    layer.load(weight(), torch.device("cpu"))
    deq = layer.dequantized_weight()
    for rows, dtype, path in [(1, torch.bfloat16, "packed"), (4, torch.bfloat16, "packed"), (5, torch.bfloat16, "dense"),
                              (1, torch.float32, "dense")]:  # fmt: skip
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
        out = layer(x)
        assert out.dtype == dtype and out.shape == (rows, 48)
        assert layer._cpu.path(x) == (path if packed_ok else "dense")
        ref = x.float() @ deq.t()
        tol = 1e-6 if dtype == torch.float32 else 1.2e-2  # bfloat16: inputs, scales and outputs rounded
        assert ((out.float() - ref).norm() / ref.norm()).item() < tol
    reference = make_linear(256, 48, False, QuantSpec(method=method, group_size=64, gguf_type=gguf_type, cpu_kernels="reference"))
    reference.load(weight(), torch.device("cpu"))
    x = torch.randn(2, 256).to(torch.bfloat16)
    assert reference._cpu is None and reference(x).dtype == torch.bfloat16 and reference._cpu.path(x) == "dense"
    torch.testing.assert_close(reference(x), (x.float() @ deq.t()).to(torch.bfloat16))


def test_cpu_packed_kernels_need_rows_in_multiples_of_16():
    from stageserve.engine.quant.cpu_kernels import packed_kernel

    assert packed_kernel(quantize_int4(weight(48, 256), 64), torch.bfloat16) is not None
    assert packed_kernel(quantize_int4(weight(40, 256), 64), torch.bfloat16) is None  # N = 40
    assert packed_kernel(quantize_int4(weight(48, 256), 64), torch.float32) is None  # no fast float32 kernel


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["int8", "int4", "gguf"])
def test_packed_linear_on_the_gpu_tunes_among_kernels_that_agree(method):
    """On CUDA the layer times its candidate kernels per batch bucket (Gluon GEMV and, for 4-bit codes, the
    tensor-core kernel among them) and whichever it keeps computes with its dequantized weight."""
    device = torch.device("cuda")
    layer = make_linear(576, 1536, False, QuantSpec(method=method))  # SmolLM2's up projection
    layer.load(weight(1536, 576), device)
    names = set(layer._kernels())
    assert any(n.startswith("gemv_gluon") for n in names)
    assert any(n.startswith("mm_gluon") for n in names) == (method != "int8")
    deq = layer.dequantized_weight()
    for m in (1, 3, 8, 16, 64):
        x = torch.randn(m, 576, device=device, dtype=torch.bfloat16)
        out = layer(x).float()
        ref = x.float() @ deq.t()
        assert ((out - ref).norm() / ref.norm()).item() < 1.2e-2, (m, layer.spec.choices)
    assert set(layer.spec.choices.values()) <= names


def test_tuner_drops_kernels_that_disagree_with_the_reference(caplog):
    """A candidate that miscomputes (wrong values, inf) is dropped with a warning before timing, however fast;
    one that cannot launch is dropped quietly; rounding-level differences stay."""
    from triton.runtime.errors import OutOfResources

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))

    def cannot_launch(_):
        raise OutOfResources(300_000, 232_448, "shared memory")

    candidates = {
        "dequant": lambda x: x @ w.t(),
        "rounded": lambda x: (x.bfloat16() @ w.bfloat16().t()).float(),
        "wrong": lambda x: x @ w.flip(0).t(),
        "inf": lambda x: torch.full((x.shape[0], 32), float("inf")),
        "too_big": cannot_launch,
    }
    with caplog.at_level("WARNING", logger="stageserve.engine.quant.linear"):
        kept = _agreeing(candidates, x, "dequant", ("shape",))
    assert set(kept) == {"dequant", "rounded"}
    assert "wrong disagrees" in caplog.text and "inf disagrees" in caplog.text and "too_big" not in caplog.text
    nan_x = torch.full_like(x, float("nan"))  # an input whose reference is not finite decides nothing
    assert set(_agreeing(candidates, nan_x, "dequant")) == set(candidates) - {"too_big"}


@pytest.mark.gpu
@pytest.mark.parametrize("method,gguf_type", [("int4", "q4_1"), ("gguf", "q4_1"), ("gguf", "q4_0"), ("gguf", "q8_0")])
def test_int4_tiles_layout_on_the_gpu_runs_tile_kernels_that_agree(method, gguf_type):
    """quant_int4_layout="tiles": a 4-bit weight with offsets (INT4 groups, GGUF Q4 blocks of 32) is re-laid at
    load (same bytes) and every batch runs the tile kernels or dequantize + GEMM; 8-bit blocks stay in rows."""
    device = torch.device("cuda")
    layer = make_linear(576, 1536, False, QuantSpec(method=method, int4_layout="tiles", gguf_type=gguf_type))
    w = weight(1536, 576)
    layer.load(w, device)
    tiled = gguf_type != "q8_0" or method == "int4"
    assert layer.packed.layout == ("tiles" if tiled else "rows")
    rows = make_linear(576, 1536, False, QuantSpec(method=method, gguf_type=gguf_type))
    assert layer.weight_bytes() == rows.quantize(w).nbytes
    kernels = layer._kernels()
    assert all(n.startswith(("tc_tiles", "wg_")) or n == "dequant" for n in kernels) == tiled
    assert any(n.startswith("wg_") for n in kernels) == (tiled and torch.cuda.get_device_capability() == (9, 0))
    deq = layer.dequantized_weight()
    for m in (1, 3, 16, 64, 256):
        x = torch.randn(m, 576, device=device, dtype=torch.bfloat16)
        ref = x.float() @ deq.t()
        for name, kernel in kernels.items():  # every candidate the tuner may keep, not only the one it did
            if _fits(name, x):
                out = kernel(x).float()
                assert ((out - ref).norm() / ref.norm()).item() < 1.2e-2, (m, name)
        out = layer(x).float()
        assert ((out - ref).norm() / ref.norm()).item() < 1.2e-2, (m, layer.spec.choices)


def test_tiled_weight_dequantizes_like_its_rows_and_refuses_to_shard():
    p = quantize_int4(weight(48, 256), 64)
    t = p.tiled()
    assert (t.layout, t.shape, t.nbytes, t.group_size) == ("tiles", p.shape, p.nbytes, 64)
    assert torch.equal(t.dequantize(), p.dequantize())
    assert torch.equal(t.rows_qweight(), p.qweight)
    with pytest.raises(ValueError, match="shard first"):
        t.narrow(0, 0, 16)
    assert cat_rows([t, t]) is None
    cpu_layer = make_linear(256, 48, False, QuantSpec(method="int4", group_size=64, int4_layout="tiles"))
    cpu_layer.load(weight(48, 256), torch.device("cpu"))
    assert cpu_layer.packed.layout == "rows"  # tiles are for the GPU's kernels


def test_fp8_kv_cache_stores_scaled_bytes_and_reads_them_back():
    cache = torch.zeros(2, 4, 4, 2, 8, dtype=FP8_KV_DTYPE)
    k, v = torch.randn(3, 2, 8) * 5, torch.randn(3, 2, 8)
    write_kv(k, v, cache, torch.tensor([0, 5, 9]), kv_scale=(0.05, 0.01))
    flat = dequant_kv(cache.view(2, 16, 2, 8), (0.05, 0.01), torch.float32)
    torch.testing.assert_close(flat[0, [0, 5, 9]], k, rtol=1 / 16, atol=1e-3)
    torch.testing.assert_close(flat[1, [0, 5, 9]], v, rtol=1 / 16, atol=1e-3)


def test_config_rejects_bad_quantization_settings():
    with pytest.raises(InvalidArgumentError, match="quantization"):
        EngineConfig(quantization="int3")
    with pytest.raises(InvalidArgumentError, match="quant_awq"):
        EngineConfig(quantization="int8", quant_awq=True)
    with pytest.raises(InvalidArgumentError, match="quant_group_size"):
        EngineConfig(quant_group_size=100)


# -- the loader and the engine ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_loaders import random_hf_state, write_gguf  # tests/unit is on sys.path under pytest

    path = tmp_path_factory.mktemp("gguf") / "tiny-q4_1.gguf"
    return write_gguf(path, random_hf_state(tied=False), Q.Q4_1)


def test_loader_keeps_gguf_blocks_packed_under_gguf(tiny_gguf):
    dense = load_model(str(tiny_gguf))
    packed = load_model(str(tiny_gguf), quantization="gguf")
    projections = [n for n in dense.state_dict if n.endswith("_proj.weight") or n == "lm_head.weight"]
    assert projections
    for name in projections:
        value = packed.state_dict[name]
        assert isinstance(value, PackedWeight) and value.fmt == "q4_1", name
        # The same weights, rows un-permuted in block form exactly as the dequantizing path does.
        assert torch.equal(value.dequantize(), dense.state_dict[name]), name
    assert not isinstance(packed.state_dict["model.embed_tokens.weight"], PackedWeight)


def greedy(loaded, **config) -> list[int]:
    engine = LLMEngine(loaded, EngineConfig(num_blocks=32, dtype="float32", device="cpu", **config))
    (request,) = engine.generate([[3, 17, 42, 9, 100, 7]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    return request.output_token_ids


def test_engine_on_kept_gguf_blocks_generates_like_the_dequantized_model(tiny_gguf):
    dense = load_model(str(tiny_gguf))
    packed = load_model(str(tiny_gguf), quantization="gguf")
    engine = LLMEngine(packed, EngineConfig(num_blocks=32, dtype="float32", quantization="gguf"))
    layer = engine.runner.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, PackedLinear) and layer.self_attn.qkv_proj.packed.fmt == "q4_1"
    assert isinstance(engine.runner.model.lm_head, PackedLinear)  # untied head: quantized too
    assert greedy(packed, quantization="gguf") == greedy(dense)


@pytest.mark.parametrize(
    "device, dtype, setting, method, expected",
    [
        ("cpu", torch.bfloat16, "auto", "gguf", True),
        ("cpu", torch.float16, "auto", "int4", True),
        ("cpu", torch.float32, "auto", "int8", False),  # float32 on the CPU has no packed kernel to gain from
        ("cuda", torch.bfloat16, "auto", "gguf", False),  # not measured on a GPU yet
        ("cuda", torch.bfloat16, "int8", "gguf", True),
        ("cpu", torch.bfloat16, "embedding", "gguf", False),
        ("cpu", torch.bfloat16, "int8", "fp8", False),  # only the packed methods
        ("cpu", torch.bfloat16, "int8", "none", False),
    ],
)  # fmt: skip
def test_tied_head_setting_resolves_per_device_and_dtype(device, dtype, setting, method, expected):
    config = EngineConfig(quantization=method, tied_lm_head=setting)
    assert QuantSpec.from_engine_config(config, torch.device(device), dtype).tied_head_int8 is expected
    off = EngineConfig(quantization=method, tied_lm_head=setting, quantize_lm_head=False)
    assert not QuantSpec.from_engine_config(off, torch.device(device), dtype).tied_head_int8


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tied_head_int8_copy_keeps_the_embedding_for_lookups(dtype):
    loaded = load_model("dummy:tiny")
    embedding_head = LLMEngine(loaded, EngineConfig(num_blocks=32, dtype=dtype, quantization="int8", tied_lm_head="embedding"))
    int8_head = LLMEngine(loaded, EngineConfig(num_blocks=32, dtype=dtype, quantization="int8", tied_lm_head="int8"))
    tied, copied = embedding_head.runner.model, int8_head.runner.model
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert isinstance(copied.lm_head, PackedLinear) and copied.lm_head.packed.fmt == "int8"
    assert copied.lm_head.packed.scales.shape[1] == 1  # per channel: PyTorch's packed CPU kernel takes it
    torch.testing.assert_close(copied.embed_tokens.weight, tied.embed_tokens.weight, rtol=0, atol=0)
    # The copy is the embedding to within half an INT8 step per row.
    embedding = copied.embed_tokens.weight.float()
    step = embedding.abs().amax(dim=1, keepdim=True) / 127
    assert ((copied.lm_head.dequantized_weight() - embedding).abs() <= step / 2 + 1e-3 * step).all()
    # Logits through the copy, at one row (packed kernel in bfloat16) and many (dense), match the tied head.
    for rows in (1, 9):
        hidden = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(copied.embed_tokens.weight.dtype)
        ours, ref = copied.compute_logits(hidden), tied.compute_logits(hidden)
        assert (ours - ref).abs().max() <= 0.02 * ref.abs().max()
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_int4_of_4bit_gguf_blocks_warns_and_points_at_gguf(tiny_gguf, caplog):
    from stageserve.engine.engine import _warn_if_requantizing

    loaded = load_model(str(tiny_gguf))
    assert loaded.extra["gguf_projection_types"] == ["Q4_1"]
    with caplog.at_level("WARNING", logger="stageserve.engine.engine"):
        assert _warn_if_requantizing(loaded, EngineConfig(quantization="int4"))
    assert "already 4-bit GGUF blocks (Q4_1)" in caplog.text and "--quantization gguf" in caplog.text
    for quantization in ("none", "int8", "gguf", "fp8"):
        assert not _warn_if_requantizing(loaded, EngineConfig(quantization=quantization))
    assert not _warn_if_requantizing(load_model("dummy:tiny"), EngineConfig(quantization="int4"))  # float weights


def test_cli_takes_quantization_flags_from_engine_config():
    from stageserve.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args(
        ["generate", "hi", "--local", "--quantization", "int4", "--quant-group-size", "64", "--quant-awq",
         "--kv-cache-dtype", "fp8_e4m3", "--quant-dispatch", "fixed", "--quant-cpu-kernels", "reference",
         "--tied-lm-head", "embedding"]
    )  # fmt: skip
    config = engine_config_from_args(args)
    assert (config.quantization, config.quant_group_size, config.quant_awq) == ("int4", 64, True)
    assert config.tied_lm_head == "embedding"
    assert (config.kv_cache_dtype, config.quant_dispatch, config.quant_cpu_kernels) == ("fp8_e4m3", "fixed", "reference")
    ev = build_parser().parse_args(["eval-quality", "--quantization", "int8", "fp8", "--max-tokens", "4"])
    assert ev.quantization == ["int8", "fp8"] and ev.max_tokens == 4 and not ev.one_at_a_time
    assert build_parser().parse_args(["eval-quality", "--one-at-a-time"]).one_at_a_time
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval-quality", "--quantization", "int3"])
