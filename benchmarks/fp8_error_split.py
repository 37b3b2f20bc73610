"""Where FP8's perplexity loss on the default model comes from: FP8 weights alone, FP8 activations alone, both.

    python benchmarks/fp8_error_split.py                 # bf16 on the CPU, ~2 minutes per row on 2 cores
    python benchmarks/fp8_error_split.py --dtype float32 --json /tmp/fp8_split.json

`--quantization fp8` quantizes weights per output channel and activations per token to e4m3 (3 mantissa
bits). This script runs the engine's FP8 layers on their reference path with one side of the product left
in the model dtype, over the same corpus and windows as `stageserve eval-quality`, so each side's share of
the loss is measured rather than guessed.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict

import torch

from stageserve.engine.config import EngineConfig
from stageserve.engine.llm import LLM
from stageserve.engine.quant import quality
from stageserve.engine.quant.formats import PackedWeight, quantize_fp8
from stageserve.engine.quant import linear
from stageserve.engine.quant.linear import Fp8Linear

MODES = {  # name -> (weights in FP8, activations in FP8)
    "fp8 weights only": (True, False),
    "fp8 activations only": (False, True),
    "fp8 weights and activations": (True, True),
}


class SplitFp8Linear(Fp8Linear):
    """Fp8Linear's reference product with either side optionally left unquantized."""

    fp8_weights, fp8_activations = True, True

    def load(self, weight, device):
        dense = weight.dequantize() if isinstance(weight, PackedWeight) else weight
        self._dense = dense.float().to(device)
        super().load(weight, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if self.fp8_activations:
            xq, scale = quantize_fp8(x2, self.per_row)
            x2 = xq.float() * scale
        w = self.dequantized_weight() if self.fp8_weights else self._dense
        return self._finish((x2 @ w.t()).to(x.dtype), x.shape)


def perplexity(config: EngineConfig) -> float:
    llm = LLM(None, config)
    runner = llm.engine.runner
    tokens = llm.tokenizer.encode(quality._data("eval_corpus.txt"))
    nll, _ = quality.corpus_scores(runner.model, tokens, 512, runner.kv_dtype)
    return math.exp(nll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    base = EngineConfig(dtype=args.dtype, device="cpu")
    rows = {"none": perplexity(base)}
    print(f"{'none':<28} perplexity {rows['none']:.3f}", flush=True)
    fp8 = EngineConfig(**{**asdict(base), **quality.VARIANTS["fp8"]})
    linear.Fp8Linear = SplitFp8Linear  # what make_linear builds for --quantization fp8
    try:
        for name, (weights, activations) in MODES.items():
            SplitFp8Linear.fp8_weights, SplitFp8Linear.fp8_activations = weights, activations
            rows[name] = perplexity(fp8)
            print(f"{name:<28} perplexity {rows[name]:.3f}  {100 * (rows[name] / rows['none'] - 1):+.2f}%", flush=True)
    finally:
        linear.Fp8Linear = Fp8Linear
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "perplexity": rows}, f, indent=1)


if __name__ == "__main__":
    main()
