"""The variants `stageserve eval-quality` compares, and its flags: no torch here, so the CLI can build its
parser without importing the engine."""

from __future__ import annotations

# Variant name -> EngineConfig overrides.
VARIANTS: dict[str, dict] = {
    "none": {},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4", "quant_group_size": 128},
    "int4-g64": {"quantization": "int4", "quant_group_size": 64},
    "int4-g32": {"quantization": "int4", "quant_group_size": 32},
    "int4-awq": {"quantization": "int4", "quant_group_size": 128, "quant_awq": True},
    "int4-awq-g64": {"quantization": "int4", "quant_group_size": 64, "quant_awq": True},
    "gguf": {"quantization": "gguf"},
    # The default model's head is tied; `gguf` leaves it to tied_lm_head=auto (an INT8 copy on the CPU in bf16).
    "gguf-head-int8": {"quantization": "gguf", "tied_lm_head": "int8"},
    "gguf-head-embedding": {"quantization": "gguf", "tied_lm_head": "embedding"},
    "fp8": {"quantization": "fp8", "fp8_scaling": "channel"},
    "fp8-tensor": {"quantization": "fp8", "fp8_scaling": "tensor"},
    "kv-fp8": {"kv_cache_dtype": "fp8_e4m3"},
}
PPL_FLAG_PCT = 3.0


def add_eval_quality_args(parser) -> None:
    parser.add_argument("--model", default=None, help="default (SmolLM2-135M-Instruct), a .gguf file or an HF dir")
    parser.add_argument(
        "--quantization", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
        help=f"variants to compare with the unquantized baseline: {', '.join(VARIANTS)} (default: all)",
    )  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    parser.add_argument("--window", type=int, default=512, help="perplexity window in tokens (default 512)")
    parser.add_argument("--dtype", default="auto", help="engine dtype (auto: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-blocks", type=int, default=256, help="KV blocks of each engine")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="generate the greedy continuations one prompt at a time (batch-1 decode) instead of together")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
