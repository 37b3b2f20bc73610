"""Static checks behind RELIABILITY.md's security list: nothing that can execute code is deserialized
from a wire or file, and request fields that cost work per step are bounded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stageserve.common.errors import InvalidArgumentError
from stageserve.sample.params import MAX_STOP_LENGTH, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
# pickle and its relatives run code while loading; torch.load unpickles unless weights_only=True.
UNSAFE = re.compile(r"\bimport (c?pickle|marshal|shelve|dill)\b|\bfrom (c?pickle|marshal|shelve|dill) import|"
                    r"\bpickle\.loads?\(|\btorch\.load\((?![^)]*weights_only=True)")


def test_no_pickle_or_unsafe_deserialization_anywhere_in_the_code():
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for folder in ("services", "kernels", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if UNSAFE.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("stop", tuple("s" for _ in range(MAX_STOP_STRINGS + 1))),
        ("stop", ("x" * (MAX_STOP_LENGTH + 1),)),
        ("stop_token_ids", tuple(range(MAX_STOP_TOKEN_IDS + 1))),
        ("logprobs", 21),
    ],
)
def test_per_step_costs_of_a_request_are_bounded(field, value):
    with pytest.raises(InvalidArgumentError, match=field):
        SamplingParams(**{field: value})
    SamplingParams(stop=("s",) * MAX_STOP_STRINGS, stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS)))
