"""The one family of exceptions that every stage raises.

Each maps to one gRPC status code in the server interceptor, so the engine and the services share a
single error path: the core raises, the boundary translates.
"""

from __future__ import annotations


class StageServeError(Exception):
    """Base class of every error stageserve raises on purpose."""


class InvalidArgumentError(StageServeError, ValueError):
    """A request field is out of range or malformed. `field` names it, so clients can fix it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ResourceExhaustedError(StageServeError):
    """A bounded queue or pool is full. The caller may retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        self.retry_after_s = retry_after_s
        super().__init__(message)


class NotFoundError(StageServeError, KeyError):
    """A named thing (model, request id, sequence) does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else ""


class ModelLoadError(StageServeError):
    """A model could not be loaded: missing, corrupt, or of an unsupported architecture."""


class UnavailableError(StageServeError):
    """No worker of a needed stage can be reached right now. The caller may retry (another replica, later)."""


class DeadlineExceededError(StageServeError):
    """A call to another stage, or a wait for its next message, ran past its timeout."""


class DataLossError(StageServeError):
    """Data arrived corrupt (a KV checksum mismatch). Nothing was used; the caller may redo the work that made it."""
