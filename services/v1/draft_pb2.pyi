from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposeStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROPOSE_STATUS_UNSPECIFIED: _ClassVar[ProposeStatus]
    PROPOSE_STATUS_OK: _ClassVar[ProposeStatus]
    PROPOSE_STATUS_INVALID_ARGUMENT: _ClassVar[ProposeStatus]
    PROPOSE_STATUS_NOT_FOUND: _ClassVar[ProposeStatus]
PROPOSE_STATUS_UNSPECIFIED: ProposeStatus
PROPOSE_STATUS_OK: ProposeStatus
PROPOSE_STATUS_INVALID_ARGUMENT: ProposeStatus
PROPOSE_STATUS_NOT_FOUND: ProposeStatus

class ProposeRequest(_message.Message):
    __slots__ = ("seq_id", "new_token_ids", "k", "reset", "num_accepted")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    new_token_ids: _containers.RepeatedScalarFieldContainer[int]
    k: int
    reset: bool
    num_accepted: int
    def __init__(self, seq_id: _Optional[str] = ..., new_token_ids: _Optional[_Iterable[int]] = ..., k: _Optional[int] = ..., reset: _Optional[bool] = ..., num_accepted: _Optional[int] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ProposeBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ProposeRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[ProposeRequest, _Mapping]]] = ...) -> None: ...

class ProposeBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ProposeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ProposeResult, _Mapping]]] = ...) -> None: ...

class ProposeResult(_message.Message):
    __slots__ = ("status", "token_ids", "message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: ProposeStatus
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    message: str
    def __init__(self, status: _Optional[_Union[ProposeStatus, str]] = ..., token_ids: _Optional[_Iterable[int]] = ..., message: _Optional[str] = ...) -> None: ...

class AcceptRequest(_message.Message):
    __slots__ = ("seq_id", "num_accepted")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    num_accepted: int
    def __init__(self, seq_id: _Optional[str] = ..., num_accepted: _Optional[int] = ...) -> None: ...

class AcceptResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("seq_id",)
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    def __init__(self, seq_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...
