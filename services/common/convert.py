"""Protobuf <-> Python conversions that more than one stage needs.

Servicers stay thin by decoding each request into the library's own types here and encoding the
result back; nothing else in a stage touches `*_pb2` field semantics. Every decoder validates as it
goes and raises `InvalidArgumentError` naming the field by its path in the request, so a client sees
`rows[2].params.temperature: must be finite and >= 0, got -1.0` rather than a bare "temperature".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stageserve.common.errors import InvalidArgumentError
from stageserve.sample.params import SamplingParams
from stageserve.sample.sampler import SampledToken
from stageserve.v1 import common_pb2

DEFAULT_MAX_TOKENS = SamplingParams.max_tokens
"""`max_tokens` of a request that leaves it unset, unless the caller passes its own default."""

_LITTLE_ENDIAN_F32 = np.dtype("<f4")


@contextlib.contextmanager
def field_prefix(prefix: str) -> Iterator[None]:
    """Re-raise an InvalidArgumentError from the block with its field under `prefix`.

    The libraries name fields as they know them ("temperature"); the request nests them
    ("sampling_params.temperature"), and the client needs the path it sent.
    """
    try:
        yield
    except InvalidArgumentError as exc:
        message = str(exc).removeprefix(f"{exc.field}: ")
        raise InvalidArgumentError(f"{prefix}.{exc.field}" if prefix else exc.field, message) from exc


def _float32(value: float) -> float:
    """A proto `float` as the shortest decimal that round-trips float32: 0.7f comes back as 0.7, not
    0.699999988..., so decoded params equal the ones the client wrote (and non-finite values stay so)."""
    return float(str(np.float32(value)))


# ---- sampling params -------------------------------------------------------------------------


def sampling_params_from_pb(
    pb: common_pb2.SamplingParams,
    *,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    field: str = "sampling_params",
) -> SamplingParams:
    """A validated `SamplingParams` from the proto, unset optional fields taking the Python defaults.

    `field` is the message's path in the request, prefixed to the name of any invalid field. The proto's
    "0 or negative top_k keeps all" becomes the dataclass's -1, and an unset `logprobs` ("none at all")
    becomes 0: the chosen token's logprob costs nothing, so the sampler always returns it.
    """
    defaults = SamplingParams  # class attributes hold the dataclass defaults
    with field_prefix(field):
        return SamplingParams(
            max_tokens=pb.max_tokens if pb.HasField("max_tokens") else default_max_tokens,
            temperature=_float32(pb.temperature) if pb.HasField("temperature") else defaults.temperature,
            top_k=pb.top_k if pb.top_k > 0 else -1,
            top_p=_float32(pb.top_p) if pb.HasField("top_p") else defaults.top_p,
            min_p=_float32(pb.min_p),
            repetition_penalty=(
                _float32(pb.repetition_penalty) if pb.HasField("repetition_penalty") else defaults.repetition_penalty
            ),
            frequency_penalty=_float32(pb.frequency_penalty),
            presence_penalty=_float32(pb.presence_penalty),
            seed=pb.seed if pb.HasField("seed") else None,
            stop_token_ids=tuple(pb.stop_token_ids),
            stop=tuple(pb.stop),
            ignore_eos=pb.ignore_eos,
            logprobs=pb.logprobs if pb.HasField("logprobs") else 0,
            min_tokens=pb.min_tokens,
        )


def sampling_params_to_pb(params: SamplingParams) -> common_pb2.SamplingParams:
    """The proto of `params`; `sampling_params_from_pb` gives `params` back (floats via float32)."""
    pb = common_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_k=max(params.top_k, 0),
        top_p=params.top_p,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        stop_token_ids=params.stop_token_ids,
        stop=params.stop,
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
    )
    if params.seed is not None:
        pb.seed = params.seed
    if params.logprobs:
        pb.logprobs = params.logprobs
    return pb


# ---- logits ----------------------------------------------------------------------------------


def logits_from_bytes(
    data: bytes, vocab_size: int, field: str = "logits", vocab_field: str = "vocab_size"
) -> Tensor:
    """[vocab_size] float32 CPU tensor from packed little-endian float32 bytes.

    `field` and `vocab_field` name the two in the request: `vocab_size` must be positive and `data`
    exactly 4 * vocab_size bytes. Values are not checked for NaN/inf (that would cost a pass per row).
    The tensor owns a copy, so it outlives the request message and may be written to.
    """
    if vocab_size <= 0:
        raise InvalidArgumentError(vocab_field, f"must be > 0, got {vocab_size}")
    if len(data) != 4 * vocab_size:
        raise InvalidArgumentError(
            field, f"must be 4 * vocab_size = {4 * vocab_size} bytes of float32, got {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=_LITTLE_ENDIAN_F32).astype(np.float32)  # copies, in native byte order
    return torch.from_numpy(array)


def logits_to_bytes(logits: Tensor) -> bytes:
    """Packed little-endian float32 bytes of a 1-D logits tensor (any float dtype, any device)."""
    if logits.dim() != 1 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 1-D float tensor, got {tuple(logits.shape)} {logits.dtype}")
    array = logits.detach().to("cpu", torch.float32).contiguous().numpy()
    return array.astype(_LITTLE_ENDIAN_F32, copy=False).tobytes()


# ---- sampled tokens --------------------------------------------------------------------------


def sampled_token_to_pb(token: SampledToken) -> common_pb2.SampledToken:
    """The proto of one sampler output row."""
    return common_pb2.SampledToken(
        token_id=token.token_id,
        logprob=token.logprob,
        top_logprobs=[common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in token.top_logprobs],
    )


def sampled_token_from_pb(pb: common_pb2.SampledToken) -> SampledToken:
    """A `SampledToken` from its proto (logprobs come back rounded to float32)."""
    top = tuple((t.token_id, t.logprob) for t in pb.top_logprobs)
    return SampledToken(token_id=pb.token_id, logprob=pb.logprob, top_logprobs=top)


# ---- token ids -------------------------------------------------------------------------------


def check_token_ids(token_ids: Iterable[int], vocab_size: int, field: str) -> None:
    """Raise InvalidArgumentError naming `field[i]` for the first id outside [0, vocab_size)."""
    for index, token_id in enumerate(token_ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidArgumentError(f"{field}[{index}]", f"token id {token_id} is outside [0, {vocab_size})")


# ---- chat messages ---------------------------------------------------------------------------


def chat_messages_from_pb(messages: Sequence[common_pb2.ChatMessage]) -> list[dict[str, Any]]:
    """The `[{"role", "content"}]` list chat templates iterate over (their calling convention, not ours)."""
    return [{"role": m.role, "content": m.content} for m in messages]


def chat_messages_to_pb(messages: Iterable[dict[str, Any]]) -> list[common_pb2.ChatMessage]:
    """Protos of `{"role", "content"}` dicts."""
    return [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


# ---- finish reasons --------------------------------------------------------------------------

_FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}
_FINISH_REASON_NAMES = {value: name for name, value in _FINISH_REASONS.items()}


def finish_reason_to_pb(reason: str | None) -> common_pb2.FinishReason:
    """"stop" / "length" / "abort" / "error" (the engine's strings) to the enum; None is UNSPECIFIED."""
    if reason is None:
        return common_pb2.FINISH_REASON_UNSPECIFIED
    try:
        return _FINISH_REASONS[reason]
    except KeyError:
        choices = sorted(_FINISH_REASONS)
        raise InvalidArgumentError("finish_reason", f"must be one of {choices}, got {reason!r}") from None


def finish_reason_from_pb(value: int) -> str | None:
    """The enum to the engine's string; UNSPECIFIED (not finished) is None."""
    if value == common_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    try:
        return _FINISH_REASON_NAMES[value]
    except KeyError:
        raise InvalidArgumentError("finish_reason", f"unknown value {value}") from None
