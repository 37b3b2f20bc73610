"""The Draft gRPC service: a thin layer over `NgramProposer`.

It keeps per-sequence state, so a decode worker must send every call of one sequence to the same
replica (route by sequence id). Callers send only the tokens appended since their last call; a replica
that evicted or never saw a sequence answers Accept with NOT_FOUND, and its next Propose starts the
sequence afresh from whatever tokens that call carries.

Run one with `stageserve serve draft --server-port 50053`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc.aio

from stageserve.common.errors import InvalidArgumentError
from stageserve.common.server import ServerConfig, ServerHandle, create_server, serve_until_stopped
from stageserve.draft.ngram import NgramProposer
from stageserve.v1 import draft_pb2, draft_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftServiceConfig:
    """Configuration of one n-gram drafter replica."""

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

    def make_proposer(self) -> NgramProposer:
        return NgramProposer(self.max_n, self.min_n, self.max_sequences, self.max_history)


@dataclass(frozen=True)
class ProposeCall:
    """A decoded `ProposeRequest`; the proposer validates it."""

    seq_id: str
    new_token_ids: tuple[int, ...]
    k: int

    @classmethod
    def from_pb(cls, pb: draft_pb2.ProposeRequest) -> ProposeCall:
        return cls(pb.seq_id, tuple(pb.new_token_ids), pb.k)


class DraftServicer(draft_pb2_grpc.DraftServicer):
    """Propose, Accept and Release over one proposer. Handlers are synchronous dict work, so they run
    on the event loop, which also serializes access to the proposer."""

    def __init__(self, proposer: NgramProposer):
        self.proposer = proposer

    async def Propose(
        self, request: draft_pb2.ProposeRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.ProposeResponse:
        call = ProposeCall.from_pb(request)
        proposal = self.proposer.propose(call.seq_id, call.new_token_ids, call.k)
        return draft_pb2.ProposeResponse(token_ids=proposal)

    async def Accept(
        self, request: draft_pb2.AcceptRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.AcceptResponse:
        self.proposer.accept(request.seq_id, request.num_accepted)
        return draft_pb2.AcceptResponse()

    async def Release(
        self, request: draft_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.ReleaseResponse:
        return draft_pb2.ReleaseResponse(found=self.proposer.release(request.seq_id))


async def start(config: DraftServiceConfig, proposer: NgramProposer | None = None) -> ServerHandle:
    """Serve a proposer (the config's, unless given) and report ready. The caller stops the handle."""
    if proposer is None:
        proposer = config.make_proposer()
    handle = await create_server(config.server, [DraftServicer(proposer)])
    await handle.set_ready(True)
    logger.info("n-gram drafter serving on %s", handle.address)
    return handle


async def serve(config: DraftServiceConfig) -> None:
    await serve_until_stopped(await start(config))
