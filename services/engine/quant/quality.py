"""`stageserve eval-quality`: what a quantization costs, measured on a fixed corpus and prompt set.

For each variant the same model is loaded with that quantization, and compared with the unquantized
baseline (variant "none", in the engine's dtype: float32 on CPU, bfloat16 on GPU) on

  - perplexity over `data/eval_corpus.txt` (~3.5k tokens of original text, in independent windows);
  - top-1 agreement: the share of corpus positions where both models' most likely next token is the same;
  - greedy agreement on `data/eval_prompts.txt`: per prompt, the share of the baseline's greedy
    continuation that the variant reproduces before it first diverges (and how many match exactly).

Nothing is downloaded; the corpus and prompts ship with the package.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources

import torch

from stageserve.engine.config import EngineConfig
from stageserve.engine.quant.variants import PPL_FLAG_PCT, VARIANTS



@dataclass
class QualityResult:
    variant: str
    perplexity: float
    ppl_delta_pct: float  # vs the baseline; positive is worse
    top1_agreement: float
    greedy_agreement: float
    greedy_exact: int  # prompts whose whole continuation matches the baseline's
    num_prompts: int
    weight_bytes: int  # projections only (embeddings and norms are never quantized)
    seconds: float


def _data(name: str) -> str:
    return resources.files("stageserve.engine.quant").joinpath(f"data/{name}").read_text(encoding="utf-8")


def eval_prompts() -> list[str]:
    return [line for line in _data("eval_prompts.txt").splitlines() if line.strip()]


@torch.inference_mode()
def corpus_scores(model, token_ids: list[int], window: int, kv_dtype: torch.dtype) -> tuple[float, torch.Tensor]:
    """(mean NLL per predicted token, argmax next token at every predicted position) over independent windows."""
    from stageserve.engine.quant.calibrate import prefill_hidden

    nll, count, argmax = 0.0, 0, []
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start : start + window]
        if len(chunk) < 2:
            break
        logits = model.compute_logits(prefill_hidden(model, chunk, kv_dtype=kv_dtype)[:-1])  # [len - 1, vocab] float32
        target = torch.tensor(chunk[1:], device=logits.device)
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += len(chunk) - 1
        argmax.append(logits.argmax(dim=-1).cpu())
    return nll / count, torch.cat(argmax)


def _prefix_share(ours: list[int], ref: list[int]) -> float:
    same = 0
    for a, b in zip(ours, ref):
        if a != b:
            break
        same += 1
    return same / max(1, len(ref))


def evaluate(
    model: str | None, variants: list[str], base: EngineConfig, *, max_tokens: int = 32, window: int = 512, log=print,
    one_at_a_time: bool = False,
) -> list[QualityResult]:
    """Run every variant (the baseline "none" first, always) and compare each with it."""
    from stageserve.engine.llm import LLM
    from stageserve.engine.quant.linear import linear_weight_bytes
    from stageserve.sample.params import SamplingParams

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    order = ["none"] + [v for v in variants if v != "none"]
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompts = eval_prompts()
    results, ref = [], None
    for i, variant in enumerate(order):
        t0 = time.monotonic()
        print(f"eval-quality: [{i + 1}/{len(order)}] {variant}: load, {len(prompts)} prompts, perplexity", file=sys.stderr, flush=True)
        config = EngineConfig(**{**asdict(base), **VARIANTS[variant]})
        llm = LLM(model, config)
        if llm.tokenizer is None:
            raise ValueError("eval-quality needs a model with a tokenizer (not a dummy shape)")
        tokens = llm.tokenizer.encode(_data("eval_corpus.txt"))
        runner = llm.engine.runner
        nll, argmax = corpus_scores(runner.model, tokens, window, runner.kv_dtype)
        if one_at_a_time:  # batch-1 decode: the path single-stream serving takes (small-batch kernels)
            outs = [llm.generate([p], greedy)[0].token_ids for p in prompts]
        else:
            outs = [c.token_ids for c in llm.generate(prompts, greedy)]
        if ref is None:
            ref = (nll, argmax, outs)
        base_ppl = math.exp(ref[0])
        result = QualityResult(
            variant=variant,
            perplexity=math.exp(nll),
            ppl_delta_pct=100 * (math.exp(nll) / base_ppl - 1),
            top1_agreement=(argmax == ref[1]).float().mean().item(),
            greedy_agreement=sum(_prefix_share(o, r) for o, r in zip(outs, ref[2])) / len(prompts),
            greedy_exact=sum(o == r for o, r in zip(outs, ref[2])),
            num_prompts=len(prompts),
            weight_bytes=linear_weight_bytes(llm.engine.runner.model),
            seconds=time.monotonic() - t0,
        )
        results.append(result)
        log(format_row(result))
        del llm
    return results


TABLE_HEADER = (
    "| variant | perplexity | vs baseline | top-1 agreement | greedy agreement | exact continuations | projection + head weights |\n"
    "|---|---|---|---|---|---|---|"
)


def format_row(r: QualityResult) -> str:
    flag = " **(>3% worse)**" if r.ppl_delta_pct > PPL_FLAG_PCT else ""
    return (
        f"| {r.variant} | {r.perplexity:.3f} | {r.ppl_delta_pct:+.2f}%{flag} | {100 * r.top1_agreement:.1f}% "
        f"| {100 * r.greedy_agreement:.1f}% | {r.greedy_exact}/{r.num_prompts} | {r.weight_bytes / 2**20:.1f} MiB |"
    )


def cmd_eval_quality(args) -> int:
    base = EngineConfig(dtype=args.dtype, device=args.device, num_blocks=max(64, args.num_blocks))
    log = lambda line: print(line, flush=True)  # noqa: E731
    log(TABLE_HEADER)
    results = evaluate(args.model, args.quantization, base, max_tokens=args.max_tokens, window=args.window, log=log,
                       one_at_a_time=args.one_at_a_time)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model or "default", "dtype": args.dtype, "device": args.device,
                       "max_tokens": args.max_tokens, "window": args.window, "one_at_a_time": args.one_at_a_time,
                       "results": [asdict(r) for r in results]}, f, indent=2)  # fmt: skip
    return 0
