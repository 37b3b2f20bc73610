"""What one request asks of the sampler: the OpenAI / vLLM sampling knobs, validated once.

`SamplingParams` is frozen and validates itself in `__post_init__`, so any instance that exists is
valid: the gateway builds it from the request, a bad field becomes `InvalidArgumentError(field)` (gRPC
`INVALID_ARGUMENT`), and the sampler never re-checks. Derive variants with `dataclasses.replace`, which
validates again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stageserve.common.errors import InvalidArgumentError

MAX_LOGPROBS = 20
"""The most top logprobs a request may ask for per token (the OpenAI API's limit)."""

MAX_SEED = 2**63
"""Seeds live in [0, 2**63): they must fit a signed int64 on every wire format we speak."""

MAX_STOP_STRINGS, MAX_STOP_LENGTH, MAX_STOP_TOKEN_IDS = 16, 256, 64
"""Bounds on a request's stop strings (count, characters each) and stop token ids: matching them runs on
every step, so a hostile request must not make that cost unbounded."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request. Every field has a neutral default."""

    max_tokens: int = 16
    """Most tokens to generate; >= 1."""
    temperature: float = 1.0
    """Logits are divided by it; >= 0 and finite. 0 means greedy (argmax)."""
    top_k: int = -1
    """Keep only the k most likely tokens; >= 1 to enable, -1 or 0 disables."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p; in (0, 1], 1 disables."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; in [0, 1], 0 disables."""
    repetition_penalty: float = 1.0
    """HF/vLLM: logits of tokens seen in prompt or output are divided (if > 0) or multiplied by it; > 0."""
    frequency_penalty: float = 0.0
    """OpenAI: subtracted once per occurrence of a token in the output; in [-2, 2]."""
    presence_penalty: float = 0.0
    """OpenAI: subtracted once from every token present in the output; in [-2, 2]."""
    seed: int | None = None
    """Makes sampling reproducible regardless of batching; in [0, 2**63), None draws from the engine's RNG."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (in addition to EOS); each >= 0."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on detokenized text by the engine or gateway; each non-empty."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks); stop_token_ids still stop."""
    logprobs: int = 0
    """How many top logprobs to return per generated token; in [0, 20]."""
    min_tokens: int = 0
    """EOS and stop_token_ids are masked until this many tokens are generated; in [0, max_tokens]."""

    def __post_init__(self) -> None:
        # gRPC and JSON decoders hand us lists; tuples keep the dataclass hashable and truly frozen.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax of the (penalized) logits: no randomness at all."""
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise InvalidArgumentError naming the first out-of-range field."""
        _require(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        _require(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be finite and >= 0, got {self.temperature}",
        )
        _require(self.top_k >= -1, "top_k", f"must be -1, 0 (disabled) or >= 1, got {self.top_k}")
        _require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _require(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            f"must be finite and > 0, got {self.repetition_penalty}",
        )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _require(-2.0 <= value <= 2.0, name, f"must be in [-2, 2], got {value}")
        _require(0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.seed is not None:
            _require(0 <= self.seed < MAX_SEED, "seed", f"must be in [0, 2**63), got {self.seed}")
        _require(
            0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
        )
        _require(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "token ids must be >= 0")
        _require(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS}")
        _require(all(self.stop), "stop", "stop strings must be non-empty")
        _require(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings")
        _require(all(len(s) <= MAX_STOP_LENGTH for s in self.stop), "stop", f"each at most {MAX_STOP_LENGTH} characters")


def _require(ok: bool, field: str, message: str) -> None:
    """One line per rule above instead of an if/raise pair each."""
    if not ok:
        raise InvalidArgumentError(field, message)
