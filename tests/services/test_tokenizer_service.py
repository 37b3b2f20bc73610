"""The Tokenizer service on a real grpc.aio server (port 0), against the tokenizer library it wraps."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stageserve.common.config import parse_config
from stageserve.common.server import ServerConfig
from stageserve.engine.loader.default_model import default_model_path
from stageserve.tokenizer.detokenize import detokenize_incrementally
from stageserve.tokenizer.service import TokenizerServiceConfig, load_configured_tokenizer, start
from stageserve.tokenizer.text_tokenizer import TextTokenizer, load_tokenizer
from stageserve.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x ** 2\n",
    "日本語のテキスト, café, emoji: 😀👍🏽 👨‍👩‍👧‍👦",
    "<|im_start|>user\nhi<|im_end|>",
    "  42 and   7",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? 👍"},
]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return load_tokenizer(default_model_path())


@contextlib.asynccontextmanager
async def serving(tokenizer: TextTokenizer, **server) -> AsyncIterator[tokenizer_pb2_grpc.TokenizerStub]:
    handle = await start(TokenizerServiceConfig(server=ServerConfig(**server)), tokenizer)
    try:
        async with grpc.aio.insecure_channel(handle.address) as channel:
            yield tokenizer_pb2_grpc.TokenizerStub(channel)
    finally:
        await handle.stop(grace=0)


def run(body):
    return asyncio.run(body())


def chat_pb(messages: list[dict]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def test_tokenize_gives_the_library_ids(tokenizer):
    async def body():
        async with serving(tokenizer) as stub:
            for text in TEXTS:
                for special in (False, True):
                    reply = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=text, add_special_tokens=special))
                    assert list(reply.token_ids) == tokenizer.encode(text, add_special_tokens=special)

    run(body)


def test_tokenize_chat_renders_the_template_then_encodes(tokenizer):
    async def body():
        async with serving(tokenizer) as stub:
            request = tokenizer_pb2.TokenizeRequest(chat=common_pb2.ChatMessages(messages=chat_pb(CONVERSATION)))
            reply = await stub.Tokenize(request)
            prompt = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)
            assert list(reply.token_ids) == tokenizer.encode(prompt)
            assert tokenizer.decode(reply.token_ids, skip_special_tokens=False) == prompt

    run(body)


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_apply_chat_template_matches_the_library(tokenizer, generation_prompt):
    async def body():
        async with serving(tokenizer) as stub:
            request = tokenizer_pb2.ApplyChatTemplateRequest(
                messages=chat_pb(CONVERSATION), add_generation_prompt=generation_prompt
            )
            reply = await stub.ApplyChatTemplate(request)
            assert reply.prompt == tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt)
            assert reply.prompt.endswith("<|im_start|>assistant\n") == generation_prompt

    run(body)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_detokenize_reassembles_the_text(tokenizer, skip_special_tokens):
    text = " ".join(TEXTS)
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]

    async def body():
        async with serving(tokenizer) as stub:
            pieces, offsets = [], (0, 0)
            for end in range(1, len(ids) + 1):  # one call per token, as a streaming gateway would make
                request = tokenizer_pb2.DetokenizeRequest(
                    token_ids=ids[:end], prefix_offset=offsets[0], read_offset=offsets[1],
                    skip_special_tokens=skip_special_tokens,
                )  # fmt: skip
                reply = await stub.Detokenize(request)
                expected = detokenize_incrementally(tokenizer, ids[:end], *offsets, skip_special_tokens)
                assert (reply.text, reply.prefix_offset, reply.read_offset) == expected
                pieces.append(reply.text)
                offsets = (reply.prefix_offset, reply.read_offset)
            return pieces

    pieces = run(body)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if not skip_special_tokens:
        assert "".join(pieces) == text + "<|im_end|>"
    assert "" in pieces  # multi-token emoji were held back until complete


@pytest.mark.parametrize(
    ("method", "request_pb", "details"),
    [
        ("Tokenize", tokenizer_pb2.TokenizeRequest(text=""), "text: must be non-empty"),
        ("Tokenize", tokenizer_pb2.TokenizeRequest(), "text: must be non-empty"),
        ("Tokenize", tokenizer_pb2.TokenizeRequest(chat=common_pb2.ChatMessages()), "chat.messages:"),
        ("Detokenize", tokenizer_pb2.DetokenizeRequest(token_ids=[1, 10**6]), "token_ids[1]: token id 1000000"),
        ("Detokenize", tokenizer_pb2.DetokenizeRequest(token_ids=[1, -3]), "token_ids[1]: token id -3"),
        ("Detokenize", tokenizer_pb2.DetokenizeRequest(token_ids=[1, 2], read_offset=3), "read_offset:"),
        (
            "Detokenize",
            tokenizer_pb2.DetokenizeRequest(token_ids=[1, 2], prefix_offset=2, read_offset=1),
            "prefix_offset:",
        ),
        ("ApplyChatTemplate", tokenizer_pb2.ApplyChatTemplateRequest(), "messages:"),
    ],
)
def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving(tokenizer, method, request_pb, details):
    async def body():
        async with serving(tokenizer) as stub:
            err = await rpc_error(getattr(stub, method)(request_pb))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.details().startswith(details), err.details()
            reply = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="still here"))
            assert list(reply.token_ids) == tokenizer.encode("still here")

    run(body)


def test_oversized_request_is_rejected(tokenizer):
    async def body():
        async with serving(tokenizer, max_receive_message_bytes=4096) as stub:
            err = await rpc_error(stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="word " * 2000)))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            reply = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="word " * 100))
            assert list(reply.token_ids) == tokenizer.encode("word " * 100)

    run(body)


def test_ready_after_start_and_config_from_flags(tokenizer):
    config = parse_config(TokenizerServiceConfig, ["--model-path", str(default_model_path()), "--server-port", "0"])
    assert config.model_path == str(default_model_path()) and config.server.port == 0
    assert load_configured_tokenizer(None).vocab_size == tokenizer.vocab_size

    async def body():
        handle = await start(config)  # loads the tokenizer itself
        try:
            async with grpc.aio.insecure_channel(handle.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(service="stageserve.v1.Tokenizer"))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await handle.stop(grace=0)

    run(body)
