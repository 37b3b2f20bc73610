"""The Draft service's boundary types: proposal calls and their per-item results, with from_pb / to_pb.

The server decodes requests with them and the client (`RemoteDraft`) builds requests and reads replies
with them, so neither side handles the protobuf fields by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stageserve.common.errors import InvalidArgumentError, NotFoundError
from stageserve.draft.local import ItemError
from stageserve.engine.speculative import DraftCall
from stageserve.v1 import draft_pb2

MAX_BATCH_ITEMS = 256
"""The most items one ProposeBatch may carry (a client splits a larger round)."""


@dataclass(frozen=True)
class ProposeCall:
    """A decoded `ProposeRequest` (one `Propose`, or one item of a `ProposeBatch`); the proposer validates it."""

    seq_id: str
    new_token_ids: tuple[int, ...]
    k: int
    reset: bool = False
    num_accepted: int | None = None

    @classmethod
    def from_pb(cls, pb: draft_pb2.ProposeRequest) -> ProposeCall:
        accepted = pb.num_accepted if pb.HasField("num_accepted") else None
        return cls(pb.seq_id, tuple(pb.new_token_ids), pb.k, pb.reset, accepted)

    @classmethod
    def from_call(cls, call: DraftCall) -> ProposeCall:
        return cls(call.seq_id, tuple(call.new_token_ids), call.k, call.reset, call.num_accepted)

    def to_pb(self) -> draft_pb2.ProposeRequest:
        return draft_pb2.ProposeRequest(
            seq_id=self.seq_id, new_token_ids=self.new_token_ids, k=self.k, reset=self.reset,
            num_accepted=self.num_accepted,
        )  # fmt: skip

    def to_call(self) -> DraftCall:
        return DraftCall(self.seq_id, list(self.new_token_ids), self.k, self.reset, self.num_accepted)


def batch_from_pb(pb: draft_pb2.ProposeBatchRequest) -> list[DraftCall]:
    """A ProposeBatch's items, after the checks that fail it as a whole: how many items there are, and that
    their seq_ids are non-empty and distinct (two items of one sequence would depend on their order)."""
    if len(pb.items) > MAX_BATCH_ITEMS:
        raise InvalidArgumentError("items", f"at most {MAX_BATCH_ITEMS} per request, got {len(pb.items)}")
    first: dict[str, int] = {}
    for i, item in enumerate(pb.items):
        if not item.seq_id:
            raise InvalidArgumentError(f"items[{i}].seq_id", "must be non-empty")
        j = first.setdefault(item.seq_id, i)
        if j != i:
            raise InvalidArgumentError(f"items[{i}].seq_id", f"repeats items[{j}].seq_id; one item per sequence")
    return [ProposeCall.from_pb(item).to_call() for item in pb.items]


def batch_to_pb(calls: Sequence[DraftCall]) -> draft_pb2.ProposeBatchRequest:
    return draft_pb2.ProposeBatchRequest(items=[ProposeCall.from_call(c).to_pb() for c in calls])


@dataclass(frozen=True)
class ProposeResult:
    """One batch item's outcome: its proposal, or why it failed (`status` is a `draft_pb2.ProposeStatus`)."""

    status: int
    token_ids: tuple[int, ...] = ()
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == draft_pb2.PROPOSE_STATUS_OK

    @classmethod
    def of(cls, outcome: list[int] | ItemError) -> ProposeResult:
        if isinstance(outcome, list):
            return cls(draft_pb2.PROPOSE_STATUS_OK, tuple(outcome))
        not_found = isinstance(outcome, NotFoundError)
        status = draft_pb2.PROPOSE_STATUS_NOT_FOUND if not_found else draft_pb2.PROPOSE_STATUS_INVALID_ARGUMENT
        return cls(status, message=str(outcome))

    @classmethod
    def from_pb(cls, pb: draft_pb2.ProposeResult) -> ProposeResult:
        return cls(pb.status, tuple(pb.token_ids), pb.message)

    def to_pb(self) -> draft_pb2.ProposeResult:
        return draft_pb2.ProposeResult(status=self.status, token_ids=self.token_ids, message=self.message)

    @property
    def status_name(self) -> str:
        return draft_pb2.ProposeStatus.Name(self.status) if self.status in draft_pb2.ProposeStatus.values() else str(self.status)
