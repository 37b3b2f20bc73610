"""NgramProposer against a brute-force reference, plus its bounds: k, LRU eviction, history cap."""

from __future__ import annotations

import random

import pytest

from stageserve.common.errors import InvalidArgumentError, NotFoundError
from stageserve.draft.ngram import MAX_K, NgramProposer


def reference_proposal(history: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """The definition: longest n first, most recent earlier occurrence of the last n tokens, what followed it."""
    length = len(history)
    for n in range(max_n, min_n - 1, -1):
        if length <= n:
            continue
        suffix = history[length - n :]
        for start in range(length - n - 1, -1, -1):
            if history[start : start + n] == suffix:
                return history[start + n : start + n + k]
    return []


def test_repeating_pattern_proposes_its_continuation():
    proposer = NgramProposer()
    assert proposer.propose("s", [1, 2, 3, 4, 1, 2, 3], k=4) == [4, 1, 2, 3]
    # The decode worker accepted 4, 1, 2 and sampled 3: the tail is now ...4 1 2 3 4 1 2 3.
    proposer.accept("s", 3)
    assert proposer.propose("s", [4, 1, 2, 3], k=4) == [4, 1, 2, 3]
    assert proposer.propose("s", [4], k=2) == [1, 2]


def test_most_recent_match_wins_and_proposal_stops_at_history_end():
    proposer = NgramProposer()
    # "7 8" was followed by 1 first, then by 2 more recently.
    assert proposer.propose("s", [7, 8, 1, 0, 7, 8, 2, 0, 7, 8], k=3) == [2, 0, 7]
    # A constant run: the most recent earlier "5 5" is followed by just one more token.
    assert proposer.propose("t", [5, 5, 5], k=3) == [5]


def test_longer_ngrams_take_priority_then_fall_back_to_shorter():
    proposer = NgramProposer(max_n=3, min_n=1)
    # Last 3 tokens "1 2 3" appeared once, followed by 9; "3" alone appeared later, followed by 5.
    assert proposer.propose("s", [1, 2, 3, 9, 3, 5, 1, 2, 3], k=1) == [9]
    # No 2- or 3-gram match for "... 6 4", but "4" appeared before, followed by 8.
    assert proposer.propose("u", [4, 8, 6, 4], k=2) == [8, 6]
    # min_n=2 refuses the single-token match.
    assert NgramProposer(max_n=3, min_n=2).propose("u", [4, 8, 6, 4], k=2) == []


def test_no_match_and_short_histories_propose_nothing():
    proposer = NgramProposer()
    assert proposer.propose("s", [], k=4) == []
    assert proposer.propose("s", [1], k=4) == []
    assert proposer.propose("s", [2, 3, 4], k=4) == []


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_on_random_repetitive_streams(seed):
    rng = random.Random(seed)
    proposer = NgramProposer(max_n=3, min_n=1)
    history: list[int] = []
    for _ in range(150):
        new = [rng.randrange(4) for _ in range(rng.randrange(0, 4))]  # 4 symbols: lots of repeats
        history += new
        k = rng.randrange(1, MAX_K + 1)
        assert proposer.propose("s", new, k) == reference_proposal(history, k)


def test_history_cap_keeps_the_newest_tokens_and_stays_correct():
    rng = random.Random(0)
    proposer = NgramProposer(max_history=40)
    for _ in range(300):
        proposal = proposer.propose("s", [rng.randrange(5)], k=5)
        held = proposer.history("s")
        assert len(held) <= 40
        assert proposal == reference_proposal(held, 5)
    # The cap drops old tokens: an old pattern is gone, a fresh one is found.
    proposer.propose("s", [100, 101, 102, 103], k=1)
    assert proposer.propose("s", [100, 101], k=2) == [102, 103]


def test_lru_eviction_caps_sequences():
    proposer = NgramProposer(max_sequences=2)
    proposer.propose("a", [1, 2, 1], k=1)
    proposer.propose("b", [3, 4, 3], k=1)
    proposer.propose("a", [2], k=1)  # touch a: b is now the least recently used
    proposer.propose("c", [5], k=1)
    assert "a" in proposer and "c" in proposer and "b" not in proposer
    assert len(proposer) == 2 and proposer.stats.num_evicted == 1
    with pytest.raises(NotFoundError):
        proposer.accept("b", 0)
    assert proposer.propose("b", [3], k=1) == []  # comes back fresh, without its old history
    assert proposer.history("b") == [3]


def test_accept_records_stats_once_per_proposal():
    proposer = NgramProposer()
    assert proposer.propose("s", [1, 2, 3, 1, 2], k=3) == [3, 1, 2]
    with pytest.raises(InvalidArgumentError) as info:
        proposer.accept("s", 4)
    assert info.value.field == "num_accepted"
    proposer.accept("s", 2)
    assert (proposer.stats.num_proposed_tokens, proposer.stats.num_accepted_tokens) == (3, 2)
    assert proposer.stats.acceptance_rate == pytest.approx(2 / 3)
    with pytest.raises(InvalidArgumentError):
        proposer.accept("s", 1)  # that proposal was already accounted for
    proposer.accept("s", 0)
    assert proposer.history("s") == [1, 2, 3, 1, 2]  # proposals never enter the history


def test_release_forgets():
    proposer = NgramProposer()
    proposer.propose("s", [1, 1], k=1)
    assert proposer.release("s") is True
    assert proposer.release("s") is False
    assert "s" not in proposer


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": MAX_K + 1}, "k"),
        ({"seq_id": ""}, "seq_id"),
        ({"new_tokens": [1, -2]}, "new_token_ids[1]"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    call = {"seq_id": "s", "new_tokens": [1, 2], "k": 4} | kwargs
    proposer = NgramProposer()
    with pytest.raises(InvalidArgumentError) as info:
        proposer.propose(**call)
    assert info.value.field == field
    assert "s" not in proposer  # a rejected call creates and appends nothing


def test_constructor_bounds():
    with pytest.raises(ValueError):
        NgramProposer(max_n=1, min_n=2)
    with pytest.raises(ValueError):
        NgramProposer(max_sequences=0)
    with pytest.raises(ValueError):
        NgramProposer(max_n=3, max_history=3)
