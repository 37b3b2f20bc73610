from stageserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeTarget(_message.Message):
    __slots__ = ("address", "kv")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    address: str
    kv: _common_pb2.KVTransferDescriptor
    def __init__(self, address: _Optional[str] = ..., kv: _Optional[_Union[_common_pb2.KVTransferDescriptor, _Mapping]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "cache_salt", "decode_target")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    DECODE_TARGET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    cache_salt: str
    decode_target: DecodeTarget
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., cache_salt: _Optional[str] = ..., decode_target: _Optional[_Union[DecodeTarget, _Mapping]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token", "num_cached_tokens", "num_computed_tokens", "finish_reason", "source", "kv_transfer_s")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    first_token: _common_pb2.SampledToken
    num_cached_tokens: int
    num_computed_tokens: int
    finish_reason: _common_pb2.FinishReason
    source: _common_pb2.KVTransferDescriptor
    kv_transfer_s: float
    def __init__(self, first_token: _Optional[_Union[_common_pb2.SampledToken, _Mapping]] = ..., num_cached_tokens: _Optional[int] = ..., num_computed_tokens: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., source: _Optional[_Union[_common_pb2.KVTransferDescriptor, _Mapping]] = ..., kv_transfer_s: _Optional[float] = ...) -> None: ...

class PrefillStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefillStatsResponse(_message.Message):
    __slots__ = ("pool", "host_id", "kv_transports")
    POOL_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    pool: _common_pb2.KVPoolStats
    host_id: str
    kv_transports: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pool: _Optional[_Union[_common_pb2.KVPoolStats, _Mapping]] = ..., host_id: _Optional[str] = ..., kv_transports: _Optional[_Iterable[str]] = ...) -> None: ...

class PrefillCancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class PrefillCancelResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...
