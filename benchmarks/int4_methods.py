"""Issue 9 probe: how much of INT4's perplexity loss on the default model other at-load quantizers recover.

The default model's weights are already 4-bit (Q4_1, blocks of 32), and `stageserve eval-quality` measures
INT4 (groups of 128, or 64 where 576 = in_features; min-max rounding) at +46% perplexity against them. This
script quantizes the same dequantized float32 weights, every projection, with

    rtn        min-max rounding to the nearest level: what `--quantization int4` runs
    clip       per (row, group), the range shrunk by the ratio in 1.0 .. 0.7 with the least output error on
               the calibration activations (calibrate.clip_int4: AWQ's clipping search)
    gptq       GPTQ (Frantar et al., 2022): columns rounded in order, each one's error spread over the columns
               not yet rounded through the inverse Hessian of the calibration activations (no act-order;
               a group's scale and offset from its weights as updated when the group starts)
    awq-scale  AWQ's per-input-channel scales alone (search_awq(clip=False): `--quant-awq` before 2026-12-05)
    awq        what `--quant-awq` runs: the scales, then clip on the scaled weights
    awq+gptq   the scales, then gptq on the scaled weights

and prints the perplexity of each over the eval corpus against the float32 model in the same run. The
calibration activations come from the package's calibration text through the float model; the eval
corpus is never seen. CPU, float32: a few minutes per group size on two cores.

    python benchmarks/int4_methods.py [--groups 128,64] [--damp 0.1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from stageserve.engine.config import EngineConfig
from stageserve.engine.llm import LLM
from stageserve.engine.quant.calibrate import calibration_text, clip_int4, prefill_hidden, sample_rows, search_awq
from stageserve.engine.quant.formats import PackedWeight, int4_codes, int4_grid, int4_packed
from stageserve.engine.quant.linear import PackedLinear, int4_group
from stageserve.engine.quant.quality import _data, corpus_scores


def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, group: int, damp: float, block: int = 128) -> PackedWeight:
    """GPTQ of w [N, K] against the activations' second moment `hessian` [K, K] (see the module doc)."""
    w, h = w.clone(), hessian.clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(n, k)
    scale, offset = torch.zeros(n, k // group), torch.zeros(n, k // group)
    for start in range(0, k, block):
        end = min(start + block, k)
        w1, err1, h1 = w[:, start:end].clone(), torch.zeros(n, end - start), hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group == 0:
                g = w1[:, i : i + group] if i + group <= end - start else w[:, col : col + group]
                scale[:, col // group], offset[:, col // group] = int4_grid(g.amin(1), g.amax(1))
            s, o = scale[:, col // group], offset[:, col // group]
            q[:, col] = int4_codes(w1[:, i], s, o)
            err = (w1[:, i] - (q[:, col] * s + o)) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, end:] -= err1 @ hinv[start:end, end:]
    return int4_packed(q, scale, offset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="128,64", help="comma-separated INT4 group sizes (64 where 128 does not divide)")
    parser.add_argument("--damp", type=float, default=0.1, help="GPTQ's dampening, a fraction of the Hessian's mean diagonal")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    float_llm = LLM(None, EngineConfig(dtype="float32", device="cpu", num_blocks=64))
    float_modules = dict(float_llm.engine.runner.model.named_modules())
    tokenizer = float_llm.tokenizer
    corpus = tokenizer.encode(_data("eval_corpus.txt"))
    calibration = tokenizer.encode(calibration_text())

    def perplexity(model) -> float:
        return math.exp(corpus_scores(model, corpus, 512, torch.float32)[0])

    base = perplexity(float_llm.engine.runner.model)
    print(f"float32 model: perplexity {base:.3f}; calibration {len(calibration)} tokens, corpus {len(corpus)}", flush=True)
    rows = []
    for group_size in (int(g) for g in args.groups.split(",")):
        llm = LLM(None, EngineConfig(dtype="float32", device="cpu", num_blocks=64, quantization="int4", quant_group_size=group_size))
        model = llm.engine.runner.model
        layers = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
        weights = {m: float_modules[name].weight.detach().float() for name, m in layers.items()}
        # The float model's activations at every projection: the Hessian (all rows) and AWQ's row sample.
        hessians, samples = {}, {}

        def record(module, inputs):
            x = inputs[0].reshape(-1, module.in_features).float()
            hessians[module] = x.t() @ x / x.shape[0]
            samples[module] = sample_rows(x)

        for m in layers.values():
            m.pending = weights[m]  # the calibration pass runs the float weight
        hooks = [m.register_forward_pre_hook(record) for m in layers.values()]
        prefill_hidden(model, calibration)
        for hook in hooks:
            hook.remove()
        group = {m: int4_group(m.in_features, group_size) for m in layers.values()}
        awq_scale = {m: search_awq(weights[m], samples[m], group[m], clip=False) for m in layers.values()}

        def gptq_scaled(m):  # GPTQ of AWQ's W s, against the Hessian of its inputs x / s
            inv = awq_scale[m][1]
            h = hessians[m] * inv[:, None] * inv[None, :]
            return quantize_gptq(weights[m] / inv, h, group[m], args.damp), inv

        methods = {
            "rtn": lambda m: (None, None),
            "clip": lambda m: (clip_int4(weights[m], samples[m], group[m]), None),
            "gptq": lambda m: (quantize_gptq(weights[m], hessians[m], group[m], args.damp), None),
            "awq-scale": lambda m: awq_scale[m],
            "awq": lambda m: search_awq(weights[m], samples[m], group[m]),
            "awq+gptq": gptq_scaled,
        }
        for name, method in methods.items():
            t0 = time.monotonic()
            for m in layers.values():
                packed, input_scale = method(m)
                m.set_packed(packed if packed is not None else m.quantize(weights[m]), input_scale)
            ppl = perplexity(model)
            row = {"group": group_size, "method": name, "perplexity": ppl, "vs_float_pct": 100 * (ppl / base - 1),
                   "seconds": time.monotonic() - t0}  # fmt: skip
            rows.append(row)
            print(f"group {group_size:3d}  {name:9s} perplexity {ppl:7.3f}  {row['vs_float_pct']:+6.2f}%  ({row['seconds']:.0f} s)", flush=True)
        del llm
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "int4_methods",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
            "float_perplexity": base, "calibration_tokens": len(calibration), "damp": args.damp, "results": rows,
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
