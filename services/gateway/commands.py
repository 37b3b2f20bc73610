"""The client commands of the `stageserve` CLI that talk to a running gateway:

    stageserve generate PROMPT --target HOST:PORT [--chat] [--json] [sampling flags]
    stageserve chat --target HOST:PORT [--system TEXT] [sampling flags]

`generate --target --json` prints the same object as `generate --local --json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TextIO

import grpc.aio

from stageserve.gateway.client import GatewayClient, Generation
from stageserve.sample.params import SamplingParams

EXIT_WORDS = ("/exit", "/quit")


def run_generate(args: argparse.Namespace, params: SamplingParams) -> int:
    """One prompt against the gateway at `args.target`: streamed text, or one JSON object."""
    return _run(_generate(args, params))


async def _generate(args: argparse.Namespace, params: SamplingParams) -> int:
    inputs = {"chat": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    options = {"params": params, "model": args.model or "", "timeout_s": args.timeout}
    if getattr(args, "traceparent", None):
        options["traceparent"] = args.traceparent
    async with GatewayClient(args.target, security=getattr(args, "security", None)) as client:
        if args.json:
            reply = await client.complete(**inputs, **options)
            print(json.dumps(Generation.from_complete(reply).to_json()))
            return 0
        async for message in client.generate(**inputs, logprobs=False, **options):
            sys.stdout.write(message.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def run_chat(args: argparse.Namespace, params: SamplingParams) -> int:
    """A streaming REPL that keeps the conversation; /exit, /quit or end of input leave it."""
    return _run(chat_repl(args.target, params, args.system, args.model or "", args.timeout))


async def chat_repl(
    target: str,
    params: SamplingParams,
    system: str | None = None,
    model: str = "",
    timeout_s: float | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    messages = [{"role": "system", "content": system}] if system else []
    loop = asyncio.get_running_loop()
    async with GatewayClient(target) as client:
        while True:
            if interactive:
                stdout.write("> ")
                stdout.flush()
            line = await loop.run_in_executor(None, stdin.readline)
            if not line or line.strip() in EXIT_WORDS:  # "" is end of input
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            reply = []
            async for message in client.generate(
                chat=messages, params=params, logprobs=False, model=model, timeout_s=timeout_s
            ):
                stdout.write(message.text)
                stdout.flush()
                reply.append(message.text)
            stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _run(coro) -> int:
    try:
        return asyncio.run(coro)
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
