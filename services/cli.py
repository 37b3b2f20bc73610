"""The `stageserve` command line.

    stageserve generate PROMPT --local [--chat] [--json] [sampling flags]
    stageserve generate PROMPT --target HOST:PORT [--chat] [--json] [sampling flags]   through a gateway
    stageserve chat --target HOST:PORT [--system TEXT] [sampling flags]                 a streaming REPL
    stageserve bench --target HOST:PORT [--dataset SHAREGPT.json] [--request-rate R] [--concurrency N] ...
    stageserve serve ROLE [the role's flags]     one service: tokenizer, sample, draft, prefill, decode, gateway
    stageserve up [--model M] [--decode-replicas N] [--sampler remote] ...   all of them, one process each
    stageserve eval-quality [--model M] [--quantization VARIANT ...]      perplexity and greedy agreement vs unquantized
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


def add_client_security_args(parser: argparse.ArgumentParser) -> None:
    """--tls-ca-file, --tls-cert-file, --tls-key-file, --auth-token-file ... for calls to a gateway."""
    from stageserve.common.config import add_dataclass_args
    from stageserve.common.security import SecurityConfig

    add_dataclass_args(parser.add_argument_group("security (with --target)"), SecurityConfig)


def cmd_generate(args: argparse.Namespace) -> int:
    from stageserve.common.config import dataclass_from_args
    from stageserve.common.security import SecurityConfig

    params = sampling_params_from_args(args)
    args.security = dataclass_from_args(SecurityConfig, args)
    if args.local == bool(args.target):
        print("error: generate needs one of --local (in-process engine) and --target HOST:PORT", file=sys.stderr)
        return 2
    if args.target:
        from stageserve.gateway.commands import run_generate

        return run_generate(args, params)
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


def cmd_serve(args: argparse.Namespace) -> int:
    from stageserve.cluster.serve import serve_role

    return serve_role(args.role, args.role_args)


def add_serve_parser(sub) -> None:
    from stageserve.common.roles import ROLE_NAMES

    serve = sub.add_parser(
        "serve", help="run one service in this process until SIGTERM/SIGINT",
        description="Run one service. Its flags come from its config class: `stageserve serve ROLE --help`.",
    )  # fmt: skip
    serve.add_argument("role", choices=ROLE_NAMES)
    serve.add_argument("role_args", nargs=argparse.REMAINDER, metavar="...", help="the role's flags")
    serve.set_defaults(func=cmd_serve)


def cmd_up(args: argparse.Namespace) -> int:
    from stageserve.cluster.up import run_up

    return run_up(args)


def add_up_parser(sub) -> None:
    from stageserve.cluster.up import add_up_args

    up = sub.add_parser(
        "up", help="start every service as its own process on this machine",
        description="Start tokenizer, [sample], draft, prefill, decode and gateway processes on this machine, "
        "wait until all are ready, print the gateway's address, and stop them all on Ctrl-C or SIGTERM.",
    )  # fmt: skip
    add_up_args(up)
    up.set_defaults(func=cmd_up)


def cmd_chat(args: argparse.Namespace) -> int:
    from stageserve.gateway.commands import run_chat

    return run_chat(args, sampling_params_from_args(args))


def add_chat_parser(sub) -> None:
    chat = sub.add_parser("chat", help="chat with a running gateway (a streaming REPL; /exit or EOF quits)")
    chat.add_argument("--target", required=True, metavar="HOST:PORT", help="the gateway")
    chat.add_argument("--system", default=None, help="a system message that opens the conversation")
    chat.add_argument("--model", default=None, help="model id (default: the gateway's default)")
    chat.add_argument("--timeout", type=float, default=None, help="deadline of each reply in seconds")
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat, max_tokens=256)


def cmd_bench(args: argparse.Namespace) -> int:
    from stageserve.bench.runner import cmd_bench as run_bench

    return run_bench(args)


def add_bench_parser(sub) -> None:
    from stageserve.bench.args import add_bench_args

    bench = sub.add_parser(
        "bench", help="load a running gateway and report TTFT, ITL, E2E latency and throughput",
        description="Send random-length or ShareGPT prompts at a Poisson rate and/or a fixed concurrency.",
    )  # fmt: skip
    add_bench_args(bench)
    bench.set_defaults(func=cmd_bench)


def cmd_eval_quality(args: argparse.Namespace) -> int:
    from stageserve.engine.quant.quality import cmd_eval_quality as run

    return run(args)


def add_eval_quality_parser(sub) -> None:
    from stageserve.engine.quant.variants import add_eval_quality_args

    ev = sub.add_parser(
        "eval-quality", help="perplexity and greedy agreement of quantized variants against the unquantized model",
        description="Load the model once per variant and compare it with the unquantized baseline on a fixed corpus "
        "and prompt set that ship with stageserve (no download).",
    )  # fmt: skip
    add_eval_quality_args(ev)
    ev.set_defaults(func=cmd_eval_quality)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stageserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--local", action="store_true", help="run the engine in this process")
    gen.add_argument("--target", default=None, metavar="HOST:PORT", help="send the prompt to this gateway instead")
    gen.add_argument("--timeout", type=float, default=None, help="with --target: the request's deadline in seconds")
    gen.add_argument(
        "--traceparent", default=None, metavar="00-TRACEID-SPANID-01",
        help="with --target: a W3C traceparent; the gateway continues that trace",
    )  # fmt: skip
    gen.add_argument("--model", default=None, help="default (SmolLM2-135M-Instruct), dummy:<shape>, a .gguf file or an HF dir")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_sampling_args(gen)
    add_engine_args(gen)
    add_client_security_args(gen)
    gen.set_defaults(func=cmd_generate)
    add_serve_parser(sub)
    add_up_parser(sub)
    add_chat_parser(sub)
    add_bench_parser(sub)
    add_eval_quality_parser(sub)
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
