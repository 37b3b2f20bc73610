"""The Sample service on a real grpc.aio server (port 0): remote tokens equal the in-process Sampler's.

Also covers the shared pb <-> Python conversions it is built on (stageserve.common.convert).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Sequence

import grpc
import grpc.aio
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stageserve.common import convert
from stageserve.common.errors import InvalidArgumentError
from stageserve.common.server import ServerConfig
from stageserve.sample.params import SamplingParams
from stageserve.sample.sampler import SampledToken, Sampler, SamplingRow
from stageserve.sample.service import SampleServiceConfig, resolve_eos_token_id, start
from stageserve.v1 import common_pb2, sample_pb2, sample_pb2_grpc

VOCAB = 512
EOS = 2
MIXED_PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, seed=1),
    SamplingParams(temperature=1.3, top_k=20, seed=2, logprobs=5),
    SamplingParams(temperature=0.9, top_p=0.8, min_p=0.05, seed=3),
    SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4, seed=4),
    SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=3),
    SamplingParams(min_tokens=8, max_tokens=20, stop_token_ids=(7, 9), seed=5),
    SamplingParams(temperature=0.5, seed=2**63 - 1, top_k=3, top_p=0.95),
]


@contextlib.asynccontextmanager
async def serving(sampler: Sampler | None = None, **server) -> AsyncIterator[sample_pb2_grpc.SampleStub]:
    config = SampleServiceConfig(eos_token_id=EOS, server=ServerConfig(**server))
    handle = await start(config, sampler)
    try:
        async with grpc.aio.insecure_channel(handle.address) as channel:
            yield sample_pb2_grpc.SampleStub(channel)
    finally:
        await handle.stop(grace=0)


def make_rows(params: Sequence[SamplingParams], seed: int = 0) -> list[SamplingRow]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p in params:
        prompt = torch.randint(0, VOCAB, (6,), generator=gen).tolist()
        output = torch.randint(0, VOCAB, (int(torch.randint(0, 5, (1,), generator=gen)),), generator=gen).tolist()
        rows.append(SamplingRow(p, prompt, output))
    return rows


def row_pb(logits: torch.Tensor, row: SamplingRow, request_id: str = "r") -> sample_pb2.SampleRow:
    return sample_pb2.SampleRow(
        request_id=request_id,
        logits=convert.logits_to_bytes(logits),
        vocab_size=logits.shape[0],
        params=convert.sampling_params_to_pb(row.params),
        prompt_token_ids=row.prompt_token_ids,
        output_token_ids=row.output_token_ids,
    )


async def remote_sample(stub, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
    request = sample_pb2.SampleRequest(rows=[row_pb(logits[i], r, f"r{i}") for i, r in enumerate(rows)])
    reply = await stub.Sample(request)
    return [convert.sampled_token_from_pb(t) for t in reply.tokens]


def assert_same_tokens(remote: Sequence[SampledToken], local: Sequence[SampledToken]) -> None:
    assert [t.token_id for t in remote] == [t.token_id for t in local]
    for r, l in zip(remote, local, strict=True):
        assert r.logprob == pytest.approx(l.logprob, rel=1e-6, abs=1e-6)
        assert [i for i, _ in r.top_logprobs] == [i for i, _ in l.top_logprobs]
        assert [v for _, v in r.top_logprobs] == pytest.approx([v for _, v in l.top_logprobs], rel=1e-6, abs=1e-6)


def test_batch_of_mixed_rows_equals_in_process_sampler():
    logits = torch.randn(len(MIXED_PARAMS), VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    rows = make_rows(MIXED_PARAMS)
    local = Sampler(eos_token_id=EOS)(logits, rows).to_lists()

    async def body():
        async with serving() as stub:
            batched = await remote_sample(stub, logits, rows)
            # Seeded and greedy rows do not depend on their batch: one at a time gives the same.
            single = [(await remote_sample(stub, logits[i : i + 1], [r]))[0] for i, r in enumerate(rows)]
            return batched, single

    batched, single = asyncio.run(body())
    assert_same_tokens(batched, local)
    assert_same_tokens(single, local)
    assert batched[2].top_logprobs and len(batched[2].top_logprobs) == 5


def test_seeded_generation_over_many_steps_equals_in_process():
    params = SamplingParams(temperature=1.0, seed=1234, repetition_penalty=1.1)
    gen = torch.Generator().manual_seed(7)
    steps = [torch.randn(1, VOCAB, generator=gen) for _ in range(12)]

    def local_run() -> list[int]:
        sampler, output = Sampler(eos_token_id=EOS), []
        for logits in steps:
            output.append(sampler(logits, [SamplingRow(params, [1, 2, 3], list(output))]).to_lists()[0].token_id)
        return output

    async def body():
        output: list[int] = []
        async with serving() as stub:
            for logits in steps:
                row = SamplingRow(params, [1, 2, 3], list(output))
                output.append((await remote_sample(stub, logits, [row]))[0].token_id)
        return output

    assert asyncio.run(body()) == local_run()


def test_rows_of_different_vocab_sizes_share_a_request():
    gen = torch.Generator().manual_seed(3)
    small, large = torch.randn(VOCAB, generator=gen), torch.randn(49152, generator=gen)
    params = SamplingParams(temperature=0.8, seed=9)

    async def body():
        async with serving() as stub:
            rows = [row_pb(small, SamplingRow(params, [1], [])), row_pb(large, SamplingRow(params, [1], []))]
            return [t.token_id for t in (await stub.Sample(sample_pb2.SampleRequest(rows=rows))).tokens]

    sampler = Sampler(eos_token_id=EOS)
    expected = [sampler(x[None], [SamplingRow(params, [1], [])]).to_lists()[0].token_id for x in (small, large)]
    assert asyncio.run(body()) == expected


def _row(**fields) -> sample_pb2.SampleRow:
    base = {"logits": bytes(4 * 8), "vocab_size": 8, "params": common_pb2.SamplingParams()}
    return sample_pb2.SampleRow(**(base | fields))


@pytest.mark.parametrize(
    ("rows", "details"),
    [
        ([_row(), _row(vocab_size=0, logits=b"")], "rows[1].vocab_size: must be > 0"),
        ([_row(logits=bytes(30))], "rows[0].logits: must be 4 * vocab_size = 32 bytes"),
        ([_row(output_token_ids=[1, 2, 8])], "rows[0].output_token_ids[2]: token id 8"),
        ([_row(prompt_token_ids=[-1])], "rows[0].prompt_token_ids[0]: token id -1"),
        ([_row(params=common_pb2.SamplingParams(temperature=-1.0))], "rows[0].params.temperature:"),
        ([_row(params=common_pb2.SamplingParams(temperature=math.nan))], "rows[0].params.temperature:"),
        ([_row(params=common_pb2.SamplingParams(top_p=0.0))], "rows[0].params.top_p:"),
        ([_row(params=common_pb2.SamplingParams(seed=2**63))], "rows[0].params.seed:"),
        ([_row(params=common_pb2.SamplingParams(max_tokens=0))], "rows[0].params.max_tokens:"),
        ([_row(params=common_pb2.SamplingParams(logprobs=21))], "rows[0].params.logprobs:"),
        ([_row()] * 5, "rows: at most 4 rows per call"),
    ],
)
def test_bad_rows_are_invalid_argument_and_the_server_keeps_serving(rows, details):
    async def body():
        handle = await start(SampleServiceConfig(eos_token_id=EOS, max_rows=4))
        try:
            async with grpc.aio.insecure_channel(handle.address) as channel:
                stub = sample_pb2_grpc.SampleStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Sample(sample_pb2.SampleRequest(rows=rows))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details().startswith(details), info.value.details()
                greedy = common_pb2.SamplingParams(temperature=0.0)
                logits = convert.logits_to_bytes(torch.arange(8.0))
                reply = await stub.Sample(sample_pb2.SampleRequest(rows=[_row(logits=logits, params=greedy)]))
                assert [t.token_id for t in reply.tokens] == [7]
        finally:
            await handle.stop(grace=0)

    asyncio.run(body())


def test_empty_batch_and_unset_max_tokens_with_min_tokens():
    async def body():
        async with serving() as stub:
            assert list((await stub.Sample(sample_pb2.SampleRequest())).tokens) == []
            # min_tokens above the default max_tokens: the sampler ignores max_tokens, so this is valid.
            params = common_pb2.SamplingParams(temperature=0.0, min_tokens=100)
            logits = torch.zeros(8)
            logits[EOS] = 10.0
            row = _row(logits=convert.logits_to_bytes(logits), params=params)
            reply = await stub.Sample(sample_pb2.SampleRequest(rows=[row]))
            assert reply.tokens[0].token_id != EOS  # masked until min_tokens is reached

    asyncio.run(body())


def test_oversized_request_is_rejected():
    async def body():
        async with serving(max_receive_message_bytes=64 * 1024) as stub:
            big = SamplingRow(SamplingParams(temperature=0.0), [], [])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Sample(sample_pb2.SampleRequest(rows=[row_pb(torch.zeros(32768), big)]))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len((await stub.Sample(sample_pb2.SampleRequest(rows=[row_pb(torch.zeros(1024), big)]))).tokens) == 1

    asyncio.run(body())


def test_ready_after_start_and_eos_from_the_default_model():
    assert resolve_eos_token_id(SampleServiceConfig()) == EOS  # SmolLM2's <|im_end|>
    assert resolve_eos_token_id(SampleServiceConfig(eos_token_id=0)) == 0

    async def body():
        handle = await start(SampleServiceConfig(eos_token_id=EOS))
        try:
            async with grpc.aio.insecure_channel(handle.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(service="stageserve.v1.Sample"))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await handle.stop(grace=0)

    asyncio.run(body())


# ---- stageserve.common.convert ---------------------------------------------------------------


@pytest.mark.parametrize(
    "params", [SamplingParams(), *MIXED_PARAMS, SamplingParams(stop=("\n\n", "END"), ignore_eos=True)]
)
def test_sampling_params_round_trip(params):
    assert convert.sampling_params_from_pb(convert.sampling_params_to_pb(params)) == params


def test_unset_proto_fields_take_the_python_defaults():
    params = convert.sampling_params_from_pb(common_pb2.SamplingParams(), default_max_tokens=64)
    assert params == SamplingParams(max_tokens=64)
    assert convert.sampling_params_from_pb(common_pb2.SamplingParams(top_k=-7)).top_k == -1
    assert convert.sampling_params_from_pb(common_pb2.SamplingParams(temperature=0.0)).is_greedy
    assert convert.sampling_params_from_pb(common_pb2.SamplingParams(logprobs=0)).logprobs == 0


def test_invalid_params_name_the_nested_field():
    with pytest.raises(InvalidArgumentError) as info:
        convert.sampling_params_from_pb(common_pb2.SamplingParams(temperature=-0.5))
    assert info.value.field == "sampling_params.temperature"
    assert str(info.value) == "sampling_params.temperature: must be finite and >= 0, got -0.5"


def test_logits_bytes_round_trip_and_validation():
    logits = torch.randn(100, dtype=torch.float64)
    decoded = convert.logits_from_bytes(convert.logits_to_bytes(logits), 100)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, logits.float())
    with pytest.raises(InvalidArgumentError, match=r"^logits: must be 4 \* vocab_size = 400 bytes"):
        convert.logits_from_bytes(bytes(399), 100)
    with pytest.raises(InvalidArgumentError, match="^vocab_size"):
        convert.logits_from_bytes(b"", 0)
    with pytest.raises(ValueError):
        convert.logits_to_bytes(torch.zeros(2, 2))


def test_finish_reasons_map_both_ways():
    for name in ("stop", "length", "abort", "error", None):
        assert convert.finish_reason_from_pb(convert.finish_reason_to_pb(name)) == name
    assert convert.finish_reason_to_pb("stop") == common_pb2.FINISH_REASON_STOP
    assert convert.finish_reason_to_pb(None) == common_pb2.FINISH_REASON_UNSPECIFIED
    with pytest.raises(InvalidArgumentError):
        convert.finish_reason_to_pb("done")
    with pytest.raises(InvalidArgumentError):
        convert.finish_reason_from_pb(99)
