"""The flags of `stageserve bench`, kept apart from the runner so building the CLI parser imports nothing heavy."""

from __future__ import annotations

import argparse
import math


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="the gateway, HOST:PORT")
    parser.add_argument("--dataset", default=None, help="a ShareGPT-format JSON file (default: random prompts)")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send (default 100)")
    parser.add_argument("--input-len", type=int, default=128, help="random prompts' mean length in tokens")
    parser.add_argument(
        "--output-len", type=int, default=None, help="tokens to generate (default: 128; ShareGPT: the reply's length)"
    )
    parser.add_argument("--range-ratio", type=float, default=0.0, help="random lengths spread over [L(1-r), L(1+r)]")
    parser.add_argument("--vocab-size", type=int, default=None, help="random ids' range (default: from ListModels)")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default inf)")
    parser.add_argument("--concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--ignore-eos", action=argparse.BooleanOptionalAction, default=True, help="generate exactly the output length"
    )
    parser.add_argument("--timeout", type=float, default=None, help="per-request deadline in seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
