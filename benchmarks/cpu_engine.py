"""Issue 2 benchmark: the in-process engine vs HF transformers `generate`, same machine, same run.

Measures on the default model (SmolLM2-135M-Instruct), for each --dtypes entry, both sides in that dtype:
  * single-stream decode tok/s (one request, decode phase only: tokens after the first / time after the first)
  * 16-request batch throughput (output tok/s over the whole run, prefill included)
HF runs the same prompts: one at a time for single-stream, and one padded batch of 16 for throughput. The
variants (and each one's paired HF run) go round robin, --repeats times, each side keeping its best run.

    python benchmarks/cpu_engine.py [--dtypes float32,bfloat16] [--quantization none,gguf] [--new-tokens 128]
                                    [--tied-heads auto,embedding] [--threads 2] [--json out.json]

--quantization runs our engine once per variant (gguf: the file's Q4_1 blocks kept packed; in bfloat16 small
batches then run PyTorch's packed int4 kernel, see services/engine/quant/cpu_kernels.py) against the same HF
run of that dtype. --tied-heads runs each quantized variant once per `tied_lm_head` setting (the default
model's head is tied: int8 computes the logits from a per-channel INT8 copy of the embedding).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from stageserve.engine.config import EngineConfig
from stageserve.engine.factory import create_engine
from stageserve.engine.loader.default_model import default_model_path
from stageserve.sample.params import SamplingParams

PROMPTS = [
    "The history of the Roman Empire begins",
    "def fibonacci(n):",
    "Explain photosynthesis to a ten-year-old.",
    "The best way to learn a new language is",
    "Once upon a time, in a small village by the sea,",
    "import numpy as np\nimport torch\n",
    "Write a short poem about autumn leaves.",
    "In economics, inflation is defined as",
]


def ours_single(engine, prompt_ids, new_tokens) -> tuple[float, float]:
    """(decode tok/s, ttft s) for one request alone."""
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0)
    engine.add_request("single", prompt_ids, params)
    start = time.perf_counter()
    first = None
    while engine.has_unfinished():
        if engine.step() and first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return (new_tokens - 1) / (end - first), first - start


def ours_batch(engine, prompts, new_tokens) -> float:
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0)
    start = time.perf_counter()
    reqs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(r.output_token_ids) for r in reqs) / elapsed


def hf_single(model, prompt_ids, new_tokens) -> tuple[float, float]:
    """Decode tok/s from two timed runs: prefill + 1 token, and prefill + N tokens."""
    x = torch.tensor([prompt_ids])
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return (new_tokens - 1) / (total - ttft), ttft


def hf_batch(model, tokenizer, prompts, new_tokens) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as HF expects for generation
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
    return (out.shape[1] - width) * len(prompts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; HF runs in the same dtype")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="single-stream runs per side; the best is kept")
    parser.add_argument("--quantization", default="none", help="comma-separated EngineConfig.quantization variants of ours")
    parser.add_argument("--tied-heads", default="auto", help="comma-separated EngineConfig.tied_lm_head settings")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from stageserve.tokenizer.text_tokenizer import load_tokenizer

    path = default_model_path()
    tok = load_tokenizer(path)
    prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.batch)]
    rows = []
    for dtype in args.dtypes.split(","):
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)).eval()
        hf_single(hf, prompts[0], 8)  # warm-up
        heads = args.tied_heads.split(",")
        variants = [
            (q, head) for q in args.quantization.split(",") for head in heads
            if q != "none" or head == heads[0]  # the head setting only applies when quantized
        ]  # fmt: skip
        engines = {}
        for quantization, head in variants:
            config = EngineConfig(
                device="cpu", dtype=dtype, num_blocks=1024, max_num_seqs=64, quantization=quantization, tied_lm_head=head
            )
            engines[quantization, head] = create_engine(None, config)
            engines[quantization, head].warmup()
        # Round robin over the variants, each paired with an HF run, so the VM's drifting background load hits
        # every side alike; each side keeps its best run.
        runs = {key: {"ours": [], "hf": [], "ours_b": [], "hf_b": []} for key in engines}
        for _ in range(args.repeats):
            for key, engine in engines.items():
                runs[key]["ours"].append(ours_single(engine, prompts[0], args.new_tokens))
                runs[key]["hf"].append(hf_single(hf, prompts[0], args.new_tokens))
        for _ in range(args.repeats):
            for key, engine in engines.items():
                runs[key]["ours_b"].append(ours_batch(engine, prompts, args.new_tokens))
                runs[key]["hf_b"].append(hf_batch(hf, tok, prompts, args.new_tokens))
        for (quantization, head), r in runs.items():
            (ours_s, ours_ttft), (hf_s, hf_ttft) = max(r["ours"]), max(r["hf"])
            ours_b, hf_b = max(r["ours_b"]), max(r["hf_b"])
            rows.append({
                "dtype": dtype,
                "quantization": quantization,
                "tied_lm_head": head,
                "single_stream_decode_tok_s": {"stageserve": ours_s, "hf": hf_s, "ratio": ours_s / hf_s},
                "ttft_s": {"stageserve": ours_ttft, "hf": hf_ttft},
                "batch_throughput_tok_s": {"stageserve": ours_b, "hf": hf_b, "ratio": ours_b / hf_b},
                "batch_over_single": ours_b / ours_s,
            })  # fmt: skip
        del engines
        del hf

    result = {
        "benchmark": "cpu_engine",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1; dequantized at load under quantization none)",
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "results": rows,
        "targets": {"single_vs_hf": 1.5, "batch_over_single": 4.0},
    }
    print(f"{'dtype / ours':34} {'metric':30} {'stageserve':>11} {'HF':>11} {'ratio':>7}")
    for r in rows:
        s, t, b = r["single_stream_decode_tok_s"], r["ttft_s"], r["batch_throughput_tok_s"]
        name = f"{r['dtype']} / {r['quantization']}" + (f" / head {r['tied_lm_head']}" if r["quantization"] != "none" else "")
        print(f"{name:34} {'single-stream decode tok/s':30} {s['stageserve']:11.1f} {s['hf']:11.1f} {s['ratio']:7.2f}")
        print(f"{name:34} {'TTFT s':30} {t['stageserve']:11.3f} {t['hf']:11.3f}")
        print(f"{name:34} {f'batch-{args.batch} output tok/s':30} {b['stageserve']:11.1f} {b['hf']:11.1f} {b['ratio']:7.2f}")
        print(f"{name:34} {'batch / single-stream (ours)':30} {r['batch_over_single']:11.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
