"""What the client sees when a call to another stage fails: the stage's status, mapped onto our errors.

A worker's own verdict on the request (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) reaches the client
with the same code, prefixed with the stage that said it; anything unexpected becomes INTERNAL.
"""

from __future__ import annotations

import grpc
import grpc.aio

from stageserve.common.errors import (
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    StageServeError,
    UnavailableError,
)


class UpstreamError(StageServeError):
    """A stage failed in a way the client cannot act on (INTERNAL, or a broken stream)."""


class WorkerLostError(UnavailableError):
    """A prefill or decode worker went away mid-request (its call failed UNAVAILABLE or CANCELLED, or the
    gateway's probes found it gone). The request may run again on another worker (`worker_retry`)."""

    def __init__(self, message: str, address: str = ""):
        super().__init__(message)
        self.address = address  # the lost worker's


def upstream_error(stage: str, address: str, exc: grpc.aio.AioRpcError) -> StageServeError:
    """The error to raise to our client for `exc`, which the `stage` worker at `address` returned."""
    code, details = exc.code(), exc.details() or ""
    where = f"{stage} worker {address}"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, message = details.partition(": ")
        return InvalidArgumentError(field, message) if sep else InvalidArgumentError(stage, details)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(f"{where} is full: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        if stage in ("prefill", "decode"):
            return WorkerLostError(f"{where} is unavailable: {details}", address)
        return UnavailableError(f"{where} is unavailable: {details}")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"{where} did not answer in time: {details}")
    if code is grpc.StatusCode.DATA_LOSS:
        return DataLossError(f"{where}: {details}")
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFoundError(f"{where}: {details}")
    return UpstreamError(f"{where} failed with {code.name}: {details}")
