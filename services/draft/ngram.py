"""N-gram prompt lookup: propose the tokens that followed the last time the sequence's tail appeared.

Life of a sequence in the proposer:

    propose(seq, prompt_ids, k)        created (evicting the least recently used one if full); the
                                       prompt becomes its history, and a proposal is made
    accept(seq, m)                     m of the last proposal were accepted (statistics only: proposals
                                       never enter the history, so there is nothing to roll back)
    propose(seq, accepted + bonus, k)  the decode worker sends what it actually appended
    ...
    release(seq)                       forgotten

Matching: for n from max_n down to min_n, take the last n tokens of the history and find their most
recent earlier occurrence; propose up to k tokens that followed it (never past the end of the history).
Each sequence keeps, per n, a map from n-gram to the latest start that has a follower, updated as
tokens arrive, so a proposal costs O(max_n) dict look-ups however long the history is.

Memory is bounded: at most `max_sequences` sequences (least recently used evicted first) and at most
`max_history` tokens each (the oldest dropped, in batches so that rebuilding the maps stays amortized O(1)).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from stageserve.common.errors import InvalidArgumentError, NotFoundError

MAX_K = 16
"""The most tokens one proposal may ask for."""


@dataclass
class DraftStats:
    """Counters over the proposer's lifetime (evicted and released sequences included)."""

    num_proposals: int = 0
    num_proposed_tokens: int = 0
    num_accepted_tokens: int = 0
    num_evicted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted over proposed tokens; 0 before anything was proposed."""
        return self.num_accepted_tokens / self.num_proposed_tokens if self.num_proposed_tokens else 0.0


@dataclass
class _SequenceState:
    """One sequence's token history and n-gram index.

    `history[j]` is the token at absolute position `base + j`; index values are absolute positions, so
    dropping old tokens only moves `base`.
    """

    ngram_sizes: range
    history: list[int] = field(default_factory=list)
    base: int = 0
    # n -> {n-gram: absolute start of its latest occurrence that is followed by at least one token}
    index: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)
    last_proposal: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.index = {n: {} for n in self.ngram_sizes}

    def extend(self, tokens: Sequence[int], max_history: int) -> None:
        for token in tokens:
            self.history.append(token)
            end = len(self.history) - 1  # the n-grams ending just before the new token now have a follower
            for n, grams in self.index.items():
                if end >= n:
                    grams[tuple(self.history[end - n : end])] = self.base + end - n
        if len(self.history) > max_history:
            # Keep 3/4 of the cap so the next rebuild is at least max_history / 4 tokens away.
            self._rebuild(self.history[len(self.history) - max(max_history * 3 // 4, 1) :])

    def _rebuild(self, kept: list[int]) -> None:
        self.base += len(self.history) - len(kept)
        self.history = []
        self.index = {n: {} for n in self.ngram_sizes}
        self.extend(kept, max_history=len(kept))

    def propose(self, k: int) -> tuple[int, ...]:
        length = len(self.history)
        for n in reversed(self.ngram_sizes):
            if length <= n:
                continue
            start = self.index[n].get(tuple(self.history[length - n :]))
            if start is not None:
                follow = start - self.base + n
                return tuple(self.history[follow : follow + k])
        return ()


class NgramProposer:
    """Per-sequence n-gram prompt lookup with bounded memory. Not thread-safe: one event loop owns it."""

    def __init__(self, max_n: int = 3, min_n: int = 1, max_sequences: int = 1024, max_history: int = 8192):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n ({min_n}) <= max_n ({max_n})")
        if max_sequences < 1 or max_history <= max_n:
            raise ValueError(f"need max_sequences >= 1 and max_history > max_n, got {max_sequences}, {max_history}")
        self.ngram_sizes = range(min_n, max_n + 1)
        self.max_sequences = max_sequences
        self.max_history = max_history
        self.stats = DraftStats()
        self._sequences: OrderedDict[str, _SequenceState] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._sequences)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._sequences

    def propose(self, seq_id: str, new_tokens: Sequence[int], k: int) -> list[int]:
        """Append `new_tokens` to the sequence (creating it if unknown), then propose up to `k` tokens."""
        _check_seq_id(seq_id)
        if not 1 <= k <= MAX_K:
            raise InvalidArgumentError("k", f"must be in [1, {MAX_K}], got {k}")
        for i, token in enumerate(new_tokens):
            if token < 0:
                raise InvalidArgumentError(f"new_token_ids[{i}]", f"token ids must be >= 0, got {token}")
        state = self._touch(seq_id)
        state.extend(new_tokens, self.max_history)
        state.last_proposal = state.propose(k)
        self.stats.num_proposals += 1
        self.stats.num_proposed_tokens += len(state.last_proposal)
        return list(state.last_proposal)

    def accept(self, seq_id: str, num_accepted: int) -> None:
        """Record that the first `num_accepted` tokens of the last proposal were accepted.

        The accepted tokens are not appended here: the caller sends them, with the token it sampled
        after them, as the next `propose`'s new tokens. Each proposal is accepted at most once.
        """
        _check_seq_id(seq_id)
        state = self._sequences.get(seq_id)
        if state is None:
            raise NotFoundError(f"sequence {seq_id!r} is unknown (never proposed for, released or evicted)")
        if not 0 <= num_accepted <= len(state.last_proposal):
            limit = len(state.last_proposal)
            raise InvalidArgumentError(
                "num_accepted", f"must be in [0, {limit}] (the last proposal's length), got {num_accepted}"
            )
        self._sequences.move_to_end(seq_id)
        self.stats.num_accepted_tokens += num_accepted
        state.last_proposal = ()

    def release(self, seq_id: str) -> bool:
        """Forget a sequence; True if it existed."""
        return self._sequences.pop(seq_id, None) is not None

    def history(self, seq_id: str) -> list[int]:
        """The tokens the proposer holds for a sequence (at most `max_history`, the newest), for tests and debugging."""
        state = self._sequences.get(seq_id)
        if state is None:
            raise NotFoundError(f"sequence {seq_id!r} is unknown")
        return list(state.history)

    def _touch(self, seq_id: str) -> _SequenceState:
        state = self._sequences.get(seq_id)
        if state is not None:
            self._sequences.move_to_end(seq_id)
            return state
        if len(self._sequences) >= self.max_sequences:
            self._sequences.popitem(last=False)
            self.stats.num_evicted += 1
        state = self._sequences[seq_id] = _SequenceState(self.ngram_sizes)
        return state


def _check_seq_id(seq_id: str) -> None:
    if not seq_id:
        raise InvalidArgumentError("seq_id", "must be non-empty")
