"""A proposer used in-process as the engine's draft (`generate --local`, tests, benchmarks): no RPC."""

from __future__ import annotations

from typing import Protocol

from stageserve.common.errors import StageServeError
from stageserve.engine.speculative import DraftCall


class Proposer(Protocol):
    """What the n-gram and model proposers share, and what the Draft service serves."""

    def propose(self, seq_id: str, new_tokens: list[int], k: int) -> list[int]: ...

    def accept(self, seq_id: str, num_accepted: int) -> None: ...

    def release(self, seq_id: str) -> bool: ...


def apply_call(proposer: Proposer, call: DraftCall) -> list[int]:
    """One DraftCall against a proposer: reset, report acceptance of the last proposal, then propose."""
    if call.reset:
        proposer.release(call.seq_id)
    elif call.num_accepted is not None:
        try:
            proposer.accept(call.seq_id, call.num_accepted)
        except StageServeError:  # evicted since: the proposal below starts it afresh
            pass
    return proposer.propose(call.seq_id, call.new_token_ids, call.k)


class LocalDraft:
    """A DraftClient over an in-process proposer."""

    def __init__(self, proposer: Proposer):
        self.proposer = proposer

    def propose(self, calls: list[DraftCall]) -> list[list[int] | None]:
        return [apply_call(self.proposer, call) for call in calls]

    def release(self, seq_id: str) -> None:
        self.proposer.release(seq_id)
