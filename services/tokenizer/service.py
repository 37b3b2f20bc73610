"""The Tokenizer gRPC service: a thin layer over `TextTokenizer` and `detokenize_incrementally`.

It holds no per-request state. Incremental detokenization round-trips its two offsets through the
caller, so any replica can serve any call of a stream:

    offsets = (0, 0)
    for each new token:  reply = Detokenize(all_ids, *offsets);  emit reply.text;  offsets = reply's

Run one with `stageserve serve tokenizer --model-path model.gguf --server-port 50051`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc.aio

from stageserve.common.convert import chat_messages_from_pb, check_token_ids, field_prefix
from stageserve.common.errors import InvalidArgumentError
from stageserve.common.server import ServerConfig, ServerHandle, create_server, serve_until_stopped
from stageserve.tokenizer.detokenize import detokenize_incrementally
from stageserve.tokenizer.text_tokenizer import TextTokenizer, load_tokenizer
from stageserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerServiceConfig:
    """Configuration of one tokenizer replica."""

    model_path: str | None = field(
        default=None,
        metadata={"help": "GGUF file or Hugging Face directory holding the tokenizer; none: the default model"},
    )
    server: ServerConfig = field(default_factory=ServerConfig)


@dataclass(frozen=True)
class DetokenizeInput:
    """A validated `DetokenizeRequest`."""

    token_ids: tuple[int, ...]
    prefix_offset: int
    read_offset: int
    skip_special_tokens: bool
    final: bool = False

    @classmethod
    def from_pb(cls, pb: tokenizer_pb2.DetokenizeRequest, vocab_size: int) -> DetokenizeInput:
        """Check ids against the vocabulary and 0 <= prefix_offset <= read_offset <= len(token_ids)."""
        token_ids = tuple(pb.token_ids)
        check_token_ids(token_ids, vocab_size, "token_ids")
        if pb.read_offset > len(token_ids):
            raise InvalidArgumentError(
                "read_offset", f"must be <= len(token_ids) = {len(token_ids)}, got {pb.read_offset}"
            )
        if pb.prefix_offset > pb.read_offset:
            raise InvalidArgumentError(
                "prefix_offset", f"must be <= read_offset = {pb.read_offset}, got {pb.prefix_offset}"
            )
        return cls(token_ids, pb.prefix_offset, pb.read_offset, pb.skip_special_tokens, pb.final)


@dataclass(frozen=True)
class DetokenizeOutput:
    """The text the newest tokens add, and the offsets to send next time."""

    text: str
    prefix_offset: int
    read_offset: int

    def to_pb(self) -> tokenizer_pb2.DetokenizeResponse:
        return tokenizer_pb2.DetokenizeResponse(
            text=self.text, prefix_offset=self.prefix_offset, read_offset=self.read_offset
        )


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    """Tokenize, Detokenize and ApplyChatTemplate for one model's tokenizer.

    Every call is a few milliseconds of Rust or Jinja at most, so it runs on the event loop; the server's
    message-size cap bounds the work a single request can ask for.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    async def Tokenize(
        self, request: tokenizer_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.TokenizeResponse:
        kind = request.WhichOneof("input")
        if kind == "chat":
            with field_prefix("chat"):
                prompt = self.tokenizer.apply_chat_template(chat_messages_from_pb(request.chat.messages))
            # The template already wrote BOS and the turn markers as text; framing again would double them.
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif kind == "text" and request.text:
            ids = self.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        else:
            raise InvalidArgumentError("text", "must be non-empty (or send chat messages instead)")
        return tokenizer_pb2.TokenizeResponse(token_ids=ids)

    async def Detokenize(
        self, request: tokenizer_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.DetokenizeResponse:
        call = DetokenizeInput.from_pb(request, self.tokenizer.vocab_size)
        text, prefix_offset, read_offset = detokenize_incrementally(
            self.tokenizer, call.token_ids, call.prefix_offset, call.read_offset, call.skip_special_tokens, call.final
        )
        return DetokenizeOutput(text, prefix_offset, read_offset).to_pb()

    async def ApplyChatTemplate(
        self, request: tokenizer_pb2.ApplyChatTemplateRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.ApplyChatTemplateResponse:
        prompt = self.tokenizer.apply_chat_template(
            chat_messages_from_pb(request.messages), add_generation_prompt=request.add_generation_prompt
        )
        return tokenizer_pb2.ApplyChatTemplateResponse(prompt=prompt)


def load_configured_tokenizer(model_path: str | None) -> TextTokenizer:
    """The tokenizer at `model_path`, or the default model's."""
    if model_path is None:
        from stageserve.engine.loader.default_model import default_model_path  # only when it is needed

        return load_tokenizer(default_model_path())
    return load_tokenizer(model_path)


async def start(config: TokenizerServiceConfig, tokenizer: TextTokenizer | None = None) -> ServerHandle:
    """Load the tokenizer (unless given), start serving it and report ready. The caller stops the handle."""
    if tokenizer is None:
        tokenizer = load_configured_tokenizer(config.model_path)
    handle = await create_server(config.server, [TokenizerServicer(tokenizer)])
    await handle.set_ready(True)
    logger.info("tokenizer serving on %s (vocab %d)", handle.address, tokenizer.vocab_size)
    return handle


async def serve(config: TokenizerServiceConfig) -> None:
    await serve_until_stopped(await start(config))
