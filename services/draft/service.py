"""The Draft gRPC service: a thin layer over a proposer (`ngram` prompt lookup or a `model` draft).

It keeps per-sequence state, so a decode worker must send every call of one sequence to the same
replica (route by sequence id). Callers send only the tokens appended since their last call; a replica
that evicted or never saw a sequence answers Accept with NOT_FOUND, and its next Propose starts the
sequence afresh from whatever tokens that call carries. Decode workers send ProposeBatch instead (one
call per replica per step), in which such an item fails on its own with PROPOSE_STATUS_NOT_FOUND so that
the worker resends its whole history; a malformed batch (too many items, an empty or repeated seq_id)
fails as a whole with INVALID_ARGUMENT.

Run one with `stageserve serve draft --server-port 50053`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import grpc.aio

from stageserve.common.errors import InvalidArgumentError
from stageserve.common.server import ServerConfig, ServerHandle, create_server, serve_until_stopped
from stageserve.draft.local import Proposer, apply_call, apply_calls
from stageserve.draft.messages import ProposeCall, ProposeResult, batch_from_pb
from stageserve.draft.ngram import NgramProposer
from stageserve.engine.config import EngineConfig
from stageserve.v1 import draft_pb2, draft_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftServiceConfig:
    """Configuration of one drafter replica."""

    proposer: Literal["ngram", "model"] = field(
        default="ngram", metadata={"help": "ngram: prompt lookup; model: greedy drafts from a (small) model"}
    )
    model: str | None = field(
        default=None, metadata={"help": "proposer=model: the draft model (default: the built-in model, as a self-draft)"}
    )
    draft_layers: int = field(
        default=8, metadata={"help": "proposer=model: keep the model's first N layers plus its norm and head; 0: all",
                             "min": 0}
    )  # fmt: skip
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(num_blocks=1024))
    max_n: int = field(default=3, metadata={"help": "longest n-gram matched against the history", "min": 1, "max": 16})
    min_n: int = field(default=1, metadata={"help": "shortest n-gram tried before giving up", "min": 1, "max": 16})
    max_sequences: int = field(
        default=4096, metadata={"help": "sequences tracked at once; the least recently used is evicted", "min": 1}
    )
    max_history: int = field(
        default=8192, metadata={"help": "tokens of history kept per sequence (the newest)", "min": 32}
    )
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        if self.min_n > self.max_n:
            raise InvalidArgumentError("min_n", f"must be <= max_n = {self.max_n}, got {self.min_n}")

    def make_proposer(self) -> Proposer:
        """Loads the draft model for proposer=model (seconds; call it off the event loop)."""
        if self.proposer == "ngram":
            return NgramProposer(self.max_n, self.min_n, self.max_sequences, self.max_history)
        from stageserve.draft.model_proposer import ModelProposer, truncate_layers
        from stageserve.engine.loader.weights import load_model
        from stageserve.engine.runner import resolve_device, resolve_dtype

        device = resolve_device(self.engine.device)
        dtype = resolve_dtype(self.engine.dtype, device)
        loaded = truncate_layers(load_model(self.model, device=device, dtype=dtype), self.draft_layers)
        return ModelProposer(loaded, self.engine, device=device, dtype=dtype)


class DraftServicer(draft_pb2_grpc.DraftServicer):
    """Propose, ProposeBatch, Accept and Release over one proposer. N-gram handlers are dict work and run
    on the event loop, which serializes them; a model proposer runs on one worker thread (a lock keeps it
    serial) so that health checks stay responsive while it computes, a whole batch in one hand-off."""

    def __init__(self, proposer: Proposer, offload: bool = False):
        self.proposer = proposer
        self.offload = offload
        self.lock = asyncio.Lock()

    async def Propose(
        self, request: draft_pb2.ProposeRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.ProposeResponse:
        proposal = await self._run(apply_call, ProposeCall.from_pb(request).to_call())
        return draft_pb2.ProposeResponse(token_ids=proposal)

    async def ProposeBatch(
        self, request: draft_pb2.ProposeBatchRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.ProposeBatchResponse:
        outcomes = await self._run(apply_calls, batch_from_pb(request))
        return draft_pb2.ProposeBatchResponse(results=[ProposeResult.of(o).to_pb() for o in outcomes])

    async def _run(self, apply: Callable, arg):
        """`apply(proposer, arg)`: here on the event loop, or on the worker thread when offloaded."""
        if not self.offload:
            return apply(self.proposer, arg)
        async with self.lock:
            return await asyncio.to_thread(apply, self.proposer, arg)

    async def Accept(
        self, request: draft_pb2.AcceptRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.AcceptResponse:
        self.proposer.accept(request.seq_id, request.num_accepted)
        return draft_pb2.AcceptResponse()

    async def Release(
        self, request: draft_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.ReleaseResponse:
        async with self.lock:
            return draft_pb2.ReleaseResponse(found=self.proposer.release(request.seq_id))


async def start(config: DraftServiceConfig, proposer: Proposer | None = None) -> ServerHandle:
    """Serve a proposer (the config's, unless given) and report ready. The caller stops the handle."""
    if proposer is None:
        proposer = await asyncio.to_thread(config.make_proposer)
    handle = await create_server(config.server, [DraftServicer(proposer, offload=not isinstance(proposer, NgramProposer))])
    await handle.set_ready(True)
    logger.info("%s drafter serving on %s", config.proposer, handle.address)
    return handle


async def serve(config: DraftServiceConfig) -> None:
    await serve_until_stopped(await start(config))
