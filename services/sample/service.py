"""The Sample gRPC service: the sampling library behind the "remote sampler" knob.

Stateless: each row carries its logits, params and token history, and a seeded row's generator is
derived from (seed, len(output_token_ids)), so a remote call gives exactly the token the in-process
`Sampler` gives for the same row on the same device type. Rows with different vocabulary sizes may
share a request; each size is sampled as its own batch.

Run one with `stageserve serve sample --server-port 50052`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc.aio
import torch

from stageserve.common.convert import (
    DEFAULT_MAX_TOKENS,
    check_token_ids,
    logits_from_bytes,
    sampled_token_to_pb,
    sampling_params_from_pb,
)
from stageserve.common.errors import InvalidArgumentError
from stageserve.common.server import ServerConfig, ServerHandle, create_server, serve_until_stopped
from stageserve.sample.sampler import SampledToken, Sampler, SamplingRow
from stageserve.v1 import sample_pb2, sample_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleServiceConfig:
    """Configuration of one sampler replica."""

    eos_token_id: int | None = field(
        default=None,
        metadata={"help": "end-of-sequence id masked while a row is below min_tokens; must match decode's. "
                  "none: read it from --model-path's tokenizer", "min": 0},
    )  # fmt: skip
    model_path: str | None = field(
        default=None,
        metadata={"help": "model whose tokenizer supplies the EOS id when --eos-token-id is not given; "
                  "none: the default model"},
    )  # fmt: skip
    device: str = field(
        default="cpu", metadata={"help": "torch device to sample on; seeded rows reproduce only on one device type"}
    )
    max_rows: int = field(default=4096, metadata={"help": "most rows one Sample call may carry", "min": 1})
    server: ServerConfig = field(default_factory=ServerConfig)


@dataclass
class SampleBatch:
    """A validated `SampleRequest`: each row's logits [vocab] float32 on the CPU, and its sampling row."""

    logits: list[torch.Tensor]
    rows: list[SamplingRow]

    @classmethod
    def from_pb(cls, pb: sample_pb2.SampleRequest, max_rows: int) -> SampleBatch:
        if len(pb.rows) > max_rows:
            raise InvalidArgumentError("rows", f"at most {max_rows} rows per call, got {len(pb.rows)}")
        logits, rows = [], []
        for i, row in enumerate(pb.rows):
            name = f"rows[{i}]"
            logits.append(logits_from_bytes(row.logits, row.vocab_size, f"{name}.logits", f"{name}.vocab_size"))
            check_token_ids(row.prompt_token_ids, row.vocab_size, f"{name}.prompt_token_ids")
            check_token_ids(row.output_token_ids, row.vocab_size, f"{name}.output_token_ids")
            # The sampler never reads max_tokens (decode enforces it), so an unset one must not trip the
            # min_tokens <= max_tokens check.
            default_max = max(DEFAULT_MAX_TOKENS, row.params.min_tokens)
            params = sampling_params_from_pb(row.params, default_max_tokens=default_max, field=f"{name}.params")
            rows.append(SamplingRow(params, tuple(row.prompt_token_ids), tuple(row.output_token_ids)))
        return cls(logits, rows)


def sample_batch(sampler: Sampler, batch: SampleBatch, device: torch.device) -> list[SampledToken]:
    """One token per row, in order: one sampler call per distinct vocabulary size."""
    groups: dict[int, list[int]] = {}
    for i, row_logits in enumerate(batch.logits):
        groups.setdefault(row_logits.shape[0], []).append(i)
    results: list[SampledToken | None] = [None] * len(batch.rows)
    for indices in groups.values():
        logits = torch.stack([batch.logits[i] for i in indices]).to(device)  # [group, vocab]
        tokens = sampler(logits, [batch.rows[i] for i in indices]).to_lists()
        for i, token in zip(indices, tokens, strict=True):
            results[i] = token
    return results  # type: ignore[return-value]  # every index belongs to exactly one group


class SampleServicer(sample_pb2_grpc.SampleServicer):
    """Samples each request's rows with one shared `Sampler` (whose own RNG serves unseeded rows)."""

    def __init__(self, sampler: Sampler, device: str | torch.device = "cpu", max_rows: int = 4096):
        self.sampler = sampler
        self.device = torch.device(device)
        self.max_rows = max_rows

    async def Sample(
        self, request: sample_pb2.SampleRequest, context: grpc.aio.ServicerContext
    ) -> sample_pb2.SampleResponse:
        batch = SampleBatch.from_pb(request, self.max_rows)
        if not batch.rows:
            return sample_pb2.SampleResponse()
        # Torch releases the GIL, so a thread keeps the event loop (health checks, other calls) responsive.
        tokens = await asyncio.to_thread(sample_batch, self.sampler, batch, self.device)
        return sample_pb2.SampleResponse(tokens=[sampled_token_to_pb(t) for t in tokens])


def resolve_eos_token_id(config: SampleServiceConfig) -> int | None:
    """The configured EOS id, else the one in the model's tokenizer."""
    if config.eos_token_id is not None:
        return config.eos_token_id
    from stageserve.tokenizer.service import load_configured_tokenizer  # only when it is needed

    return load_configured_tokenizer(config.model_path).eos_token_id


async def start(config: SampleServiceConfig, sampler: Sampler | None = None) -> ServerHandle:
    """Build the sampler (unless given), start serving and report ready. The caller stops the handle."""
    if sampler is None:
        sampler = Sampler(eos_token_id=resolve_eos_token_id(config))
    servicer = SampleServicer(sampler, config.device, config.max_rows)
    handle = await create_server(config.server, [servicer])
    await handle.set_ready(True)
    logger.info("sampler serving on %s (device %s, eos %s)", handle.address, servicer.device, sampler.eos_token_id)
    return handle


async def serve(config: SampleServiceConfig) -> None:
    await serve_until_stopped(await start(config))
