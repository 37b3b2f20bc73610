from stageserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVWrite(_message.Message):
    __slots__ = ("claim", "landed", "abort_reason")
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    LANDED_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    claim: ClaimKVRequest
    landed: _common_pb2.KVChunk
    abort_reason: str
    def __init__(self, claim: _Optional[_Union[ClaimKVRequest, _Mapping]] = ..., landed: _Optional[_Union[_common_pb2.KVChunk, _Mapping]] = ..., abort_reason: _Optional[str] = ...) -> None: ...

class KVWriteAck(_message.Message):
    __slots__ = ("claimed", "done")
    CLAIMED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    claimed: ClaimKVResponse
    done: PushKVResponse
    def __init__(self, claimed: _Optional[_Union[ClaimKVResponse, _Mapping]] = ..., done: _Optional[_Union[PushKVResponse, _Mapping]] = ...) -> None: ...

class AbortKVRequest(_message.Message):
    __slots__ = ("reservation_id", "reason")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    reason: str
    def __init__(self, reservation_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortKVResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class ClaimKVRequest(_message.Message):
    __slots__ = ("reservation_id", "lease_ms", "block_ids")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    lease_ms: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, reservation_id: _Optional[str] = ..., lease_ms: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ClaimKVResponse(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class ConnectKVRequest(_message.Message):
    __slots__ = ("unique_id", "comm_id", "peer_id", "timeout_ms")
    UNIQUE_ID_FIELD_NUMBER: _ClassVar[int]
    COMM_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    unique_id: bytes
    comm_id: str
    peer_id: str
    timeout_ms: int
    def __init__(self, unique_id: _Optional[bytes] = ..., comm_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class ConnectKVResponse(_message.Message):
    __slots__ = ("comm_id",)
    COMM_ID_FIELD_NUMBER: _ClassVar[int]
    comm_id: str
    def __init__(self, comm_id: _Optional[str] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "num_tokens", "sampling_params", "transports", "peer_id", "peer_host_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    sampling_params: _common_pb2.SamplingParams
    transports: _containers.RepeatedScalarFieldContainer[str]
    peer_id: str
    peer_host_id: str
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., transports: _Optional[_Iterable[str]] = ..., peer_id: _Optional[str] = ..., peer_host_id: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("descriptor",)
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    descriptor: _common_pb2.KVTransferDescriptor
    def __init__(self, descriptor: _Optional[_Union[_common_pb2.KVTransferDescriptor, _Mapping]] = ...) -> None: ...

class PushKVResponse(_message.Message):
    __slots__ = ("reservation_id", "num_chunks", "num_bytes")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    num_chunks: int
    num_bytes: int
    def __init__(self, reservation_id: _Optional[str] = ..., num_chunks: _Optional[int] = ..., num_bytes: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("request_id", "reservation_id", "first_token", "prompt_token_ids", "sampling_params", "num_cached_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reservation_id: str
    first_token: _common_pb2.SampledToken
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    num_cached_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., first_token: _Optional[_Union[_common_pb2.SampledToken, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("tokens", "finish_reason", "num_output_tokens")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[_common_pb2.SampledToken]
    finish_reason: _common_pb2.FinishReason
    num_output_tokens: int
    def __init__(self, tokens: _Optional[_Iterable[_Union[_common_pb2.SampledToken, _Mapping]]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., num_output_tokens: _Optional[int] = ...) -> None: ...

class DecodeCancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class DecodeCancelResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class DecodeStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecodeStatsResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: _common_pb2.KVPoolStats
    def __init__(self, pool: _Optional[_Union[_common_pb2.KVPoolStats, _Mapping]] = ...) -> None: ...
