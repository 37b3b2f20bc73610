"""A proposer used in-process as the engine's draft (`generate --local`, tests, benchmarks): no RPC.

`apply_call` and `apply_calls` are also what the Draft service runs for `Propose` and `ProposeBatch`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from stageserve.common.errors import InvalidArgumentError, NotFoundError, StageServeError
from stageserve.engine.speculative import DraftCall

logger = logging.getLogger(__name__)

ItemError = InvalidArgumentError | NotFoundError
"""What fails one call of a batch without failing the others."""


class Proposer(Protocol):
    """What the n-gram and model proposers share, and what the Draft service serves.

    A proposer may also have `propose_batch(items: list[(seq_id, new_tokens, k)]) -> list[list[int] | ItemError]`
    (distinct seq_ids), which proposes for them together; `apply_calls` uses it when it is there.
    """

    def propose(self, seq_id: str, new_tokens: list[int], k: int) -> list[int]: ...

    def accept(self, seq_id: str, num_accepted: int) -> None: ...

    def release(self, seq_id: str) -> bool: ...

    def __contains__(self, seq_id: str) -> bool: ...


def apply_call(proposer: Proposer, call: DraftCall) -> list[int]:
    """One DraftCall against a proposer (`Propose`): reset, report acceptance of the last proposal, then
    propose; a sequence the proposer does not hold starts afresh from the tokens the call carries."""
    if call.reset:
        proposer.release(call.seq_id)
    elif call.num_accepted is not None:
        try:
            proposer.accept(call.seq_id, call.num_accepted)
        except StageServeError:  # evicted since: the proposal below starts it afresh
            pass
    return proposer.propose(call.seq_id, call.new_token_ids, call.k)


def apply_calls(proposer: Proposer, calls: Sequence[DraftCall]) -> list[list[int] | ItemError]:
    """Several DraftCalls of distinct sequences (`ProposeBatch`), each ending in its proposal or its own error.

    Stricter than `apply_call`: a call without `reset` for a sequence the proposer does not hold fails
    with NotFoundError (its caller then resends the whole history, rather than the draft guessing from a
    few tokens), and an out-of-range `num_accepted` fails its call with InvalidArgumentError.
    """
    outcomes: list[list[int] | ItemError | None] = [None] * len(calls)
    ready = []
    for i, call in enumerate(calls):
        try:
            if call.reset:
                proposer.release(call.seq_id)
            elif call.seq_id not in proposer:
                raise NotFoundError(f"sequence {call.seq_id!r} is not held here (evicted or released); resend it with reset")
            elif call.num_accepted is not None:
                proposer.accept(call.seq_id, call.num_accepted)
            ready.append(i)
        except (InvalidArgumentError, NotFoundError) as exc:
            outcomes[i] = exc
    items = [(calls[i].seq_id, calls[i].new_token_ids, calls[i].k) for i in ready]
    propose_batch = getattr(proposer, "propose_batch", None)
    proposals = propose_batch(items) if propose_batch is not None else [_propose(proposer, *item) for item in items]
    for i, proposal in zip(ready, proposals, strict=True):
        outcomes[i] = proposal
    return outcomes


def _propose(proposer: Proposer, seq_id: str, new_tokens: list[int], k: int) -> list[int] | ItemError:
    try:
        return proposer.propose(seq_id, new_tokens, k)
    except (InvalidArgumentError, NotFoundError) as exc:
        return exc


class LocalDraft:
    """A DraftClient over an in-process proposer."""

    def __init__(self, proposer: Proposer):
        self.proposer = proposer

    def propose(self, calls: list[DraftCall]) -> list[list[int] | None]:
        outcomes = apply_calls(self.proposer, calls)
        for call, outcome in zip(calls, outcomes):
            if isinstance(outcome, InvalidArgumentError):  # a bug in the caller, not an eviction: say so
                logger.warning("draft refused %s: %s", call.seq_id, outcome)
        return [outcome if isinstance(outcome, list) else None for outcome in outcomes]

    def release(self, seq_id: str) -> None:
        self.proposer.release(seq_id)
