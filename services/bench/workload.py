"""What a benchmark sends, and when: random-length token prompts or ShareGPT conversations, arriving
as a Poisson process of a given rate (or all at once). Pure functions of their seed: no I/O but reading
the dataset file, so the same command replays the same workload.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stageserve.common.errors import InvalidArgumentError

# vLLM's ShareGPT filters: drop turns too short to measure, and prompts or totals past a 2k context.
MIN_SHAREGPT_TOKENS = 4
MAX_SHAREGPT_PROMPT_TOKENS = 1024
MAX_SHAREGPT_TOTAL_TOKENS = 2048
CHARS_PER_TOKEN = 4  # the usual English estimate, for counting ShareGPT lengths without a tokenizer


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: a text prompt or token ids, and how many tokens to generate."""

    prompt_len: int  # tokens (estimated for a text prompt)
    output_len: int
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """Lengths drawn uniformly from [length * (1 - r), length * (1 + r)], at least 1 (vLLM's random dataset)."""
    if length < 1:
        raise InvalidArgumentError("length", f"must be >= 1, got {length}")
    if not 0.0 <= range_ratio < 1.0:
        raise InvalidArgumentError("range_ratio", f"must be in [0, 1), got {range_ratio}")
    return max(1, math.floor(length * (1 - range_ratio))), math.ceil(length * (1 + range_ratio))


def random_requests(
    num_prompts: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int, seed: int = 0
) -> list[BenchRequest]:
    """`num_prompts` prompts of uniformly random token ids, with lengths spread by `range_ratio`."""
    if vocab_size < 1:
        raise InvalidArgumentError("vocab_size", f"must be >= 1, got {vocab_size}")
    rng = random.Random(seed)
    input_low, input_high = length_range(input_len, range_ratio)
    output_low, output_high = length_range(output_len, range_ratio)
    requests = []
    for _ in range(num_prompts):
        prompt_len = rng.randint(input_low, input_high)
        ids = tuple(rng.randrange(vocab_size) for _ in range(prompt_len))
        requests.append(BenchRequest(prompt_len, rng.randint(output_low, output_high), prompt_token_ids=ids))
    return requests


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def sharegpt_requests(
    path: str | Path,
    num_prompts: int,
    seed: int = 0,
    output_len: int | None = None,
    count_tokens: Callable[[str], int] = estimate_tokens,
) -> list[BenchRequest]:
    """Up to `num_prompts` first-turn prompts of a ShareGPT JSON file, in a seeded random order.

    Each entry's first turn is the prompt and its second the reference reply, whose length (by
    `count_tokens`) is the output length unless `output_len` fixes it. Entries with fewer than two turns
    are skipped, and so are lengths outside vLLM's filters (see the constants above).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError("dataset", f"{path}: {exc}") from exc
    if not isinstance(data, list):
        raise InvalidArgumentError("dataset", f"{path}: expected a JSON list of conversations")
    conversations = [c for entry in data if len(c := _turns(entry)) >= 2]
    random.Random(seed).shuffle(conversations)
    requests = []
    for turns in conversations:
        if len(requests) == num_prompts:
            break
        prompt_len = count_tokens(turns[0])
        reply_len = output_len if output_len is not None else count_tokens(turns[1])
        if output_len is None and (prompt_len < MIN_SHAREGPT_TOKENS or reply_len < MIN_SHAREGPT_TOKENS):
            continue
        if prompt_len > MAX_SHAREGPT_PROMPT_TOKENS or prompt_len + reply_len > MAX_SHAREGPT_TOTAL_TOKENS:
            continue
        requests.append(BenchRequest(prompt_len, reply_len, prompt=turns[0]))
    if not requests:
        raise InvalidArgumentError("dataset", f"{path}: no conversation passes the length filters")
    return requests


def _turns(entry: object) -> list[str]:
    """The turns' texts of one ShareGPT entry ({"conversations": [{"from", "value"}, ...]})."""
    if not isinstance(entry, dict):
        return []
    turns = entry.get("conversations", entry.get("conversation"))
    if not isinstance(turns, list):
        return []
    return [t["value"] for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]


def arrival_times(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send offsets in seconds from the start: a Poisson process of `request_rate` per second
    (exponential gaps), or all at 0 for an infinite rate."""
    if not request_rate > 0:
        raise InvalidArgumentError("request_rate", f"must be > 0 (inf: all at once), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times
