"""A Sampler that calls the Sample service: the `--sampler remote` placement of the sampling stage.

It runs on the decode engine's thread, so it uses a synchronous channel. Seeded requests sample
the same tokens as in process, because the sampler derives each row's generator from
(seed, number of tokens generated so far) and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stageserve.common import tracing
from stageserve.common.security import SecurityConfig, sync_channel
from stageserve.common.convert import logits_to_bytes, sampled_token_from_pb, sampling_params_to_pb
from stageserve.sample.sampler import SampledToken, SamplingRow
from stageserve.v1 import sample_pb2, sample_pb2_grpc


class RemoteSamplerOutput:
    """Quacks like SamplerOutput where the runner needs it: `to_lists()`."""

    def __init__(self, tokens: list[SampledToken]):
        self.tokens = tokens

    def to_lists(self) -> list[SampledToken]:
        return self.tokens


class RemoteSampler:
    def __init__(
        self, address: str, timeout_s: float = 10.0, max_message_bytes: int = 256 << 20, security: SecurityConfig | None = None
    ):
        options = [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = sync_channel(address, security, options)
        self.stub = sample_pb2_grpc.SampleStub(self.channel)
        self.timeout_s = timeout_s

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> RemoteSamplerOutput:
        vocab = logits.shape[1]
        cpu = logits.float().cpu()  # [batch, vocab]
        request = sample_pb2.SampleRequest(
            rows=[
                sample_pb2.SampleRow(
                    logits=logits_to_bytes(cpu[i]), vocab_size=vocab, params=sampling_params_to_pb(row.params),
                    prompt_token_ids=row.prompt_token_ids, output_token_ids=row.output_token_ids,
                )
                for i, row in enumerate(rows)
            ]
        )
        with tracing.child_span("sample.remote", {"stageserve.sample.rows": len(rows)}, kind="client"):
            response = self.stub.Sample(request, timeout=self.timeout_s, metadata=tracing.outgoing_metadata())
        if len(response.tokens) != len(rows):
            raise RuntimeError(f"sample service returned {len(response.tokens)} tokens for {len(rows)} rows")
        return RemoteSamplerOutput([sampled_token_from_pb(t) for t in response.tokens])

    def close(self) -> None:
        self.channel.close()
