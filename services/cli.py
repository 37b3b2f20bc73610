"""The `stageserve` command line.

    stageserve generate PROMPT --local [--chat] [--json] [sampling flags]
"""

from __future__ import annotations

import argparse
import json
import sys

from stageserve.common.errors import StageServeError


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default here)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1, help="-1 disables")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="makes sampled output reproducible")
    g.add_argument("--stop", action="append", default=[], help="a stop string; may be repeated")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    g.add_argument("--logprobs", type=int, default=0, help="top-n logprobs per generated token (0-20)")


def sampling_params_from_args(args: argparse.Namespace):
    from stageserve.sample.params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    from stageserve.common.config import add_dataclass_args
    from stageserve.engine.config import EngineConfig

    add_dataclass_args(parser.add_argument_group("engine"), EngineConfig)


def engine_config_from_args(args: argparse.Namespace):
    from stageserve.common.config import dataclass_from_args
    from stageserve.engine.config import EngineConfig

    return dataclass_from_args(EngineConfig, args)


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    if not args.local:
        print("error: generate needs --local (in-process engine)", file=sys.stderr)
        return 2
    from stageserve.engine.llm import LLM

    llm = LLM(args.model, engine_config_from_args(args))
    if args.json:
        [completion] = llm.generate([args.prompt], params, chat=args.chat)
        print(json.dumps(completion.to_json()))
        return 0
    for _, delta in llm.stream(args.prompt, params, chat=args.chat):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stageserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--local", action="store_true", help="run the engine in this process")
    gen.add_argument("--model", default=None, help="default (SmolLM2-135M-Instruct), dummy:<shape>, a .gguf file or an HF dir")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StageServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
