"""Per-request measurements of a benchmark, and the report made of them: latency percentiles,
throughput and errors, as a table or as JSON."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """What one request measured at the client. A failed request has `error` set (its status code name)."""

    prompt_len: int
    output_tokens: int = 0
    ttft_s: float | None = None  # to the first message carrying tokens
    itl_s: list[float] = field(default_factory=list)  # gaps between later token-carrying messages
    e2e_s: float | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None with fewer than two tokens."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default); None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencySummary:
    """Mean and percentiles of one latency, in seconds; all None when nothing was measured."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> LatencySummary:
        mean = sum(values) / len(values) if values else None
        return cls(len(values), mean, *(percentile(values, q) for q in PERCENTILES))


@dataclass(frozen=True)
class BenchReport:
    num_requests: int
    completed: int
    errors: int
    error_kinds: dict[str, int]
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_input_tokens: int
    total_output_tokens: int
    ttft: LatencySummary
    itl: LatencySummary
    tpot: LatencySummary
    e2e: LatencySummary

    def to_json(self) -> dict:
        return asdict(self)


def summarize(results: Sequence[RequestResult], duration_s: float) -> BenchReport:
    """The report over every request of a run that took `duration_s` wall seconds (throughput counts
    only completed requests; their input and output tokens)."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    rate = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return BenchReport(
        num_requests=len(results),
        completed=len(done),
        errors=len(results) - len(done),
        error_kinds=dict(Counter(r.error for r in results if not r.ok)),
        duration_s=duration_s,
        requests_per_s=rate(len(done)),
        output_tokens_per_s=rate(output_tokens),
        total_input_tokens=sum(r.prompt_len for r in done),
        total_output_tokens=output_tokens,
        ttft=LatencySummary.of([r.ttft_s for r in done if r.ttft_s is not None]),
        itl=LatencySummary.of([gap for r in done for gap in r.itl_s]),
        tpot=LatencySummary.of([t for r in done if (t := r.tpot_s) is not None]),
        e2e=LatencySummary.of([r.e2e_s for r in done if r.e2e_s is not None]),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def format_table(report: BenchReport) -> str:
    """A plain-text report: totals, then one row per latency (milliseconds)."""
    errors = ", ".join(f"{kind}: {n}" for kind, n in sorted(report.error_kinds.items()))
    lines = [
        f"{'requests':<24}{report.completed} completed / {report.num_requests} sent",
        f"{'errors':<24}{report.errors}" + (f" ({errors})" if errors else ""),
        f"{'duration (s)':<24}{report.duration_s:.2f}",
        f"{'requests/s':<24}{report.requests_per_s:.2f}",
        f"{'output tokens/s':<24}{report.output_tokens_per_s:.2f}",
        f"{'input / output tokens':<24}{report.total_input_tokens} / {report.total_output_tokens}",
        "",
        f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, summary in (("TTFT", report.ttft), ("ITL", report.itl), ("TPOT", report.tpot), ("E2E", report.e2e)):
        cells = "".join(f"{_ms(v):>10}" for v in (summary.mean, summary.p50, summary.p90, summary.p99))
        lines.append(f"{name:<14}{cells}")
    return "\n".join(lines)
