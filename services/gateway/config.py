"""Configuration of one gateway replica. Pure data: no I/O, no environment reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stageserve.common.errors import InvalidArgumentError
from stageserve.common.server import ServerConfig
from stageserve.engine.loader.default_model import DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class GatewayServiceConfig:
    """Configuration of one gateway replica: where the workers are, how many requests it admits, its timeouts."""

    tokenizer_addresses: tuple[str, ...] = field(
        metadata={"help": "host:port of each tokenizer replica (any replica serves any call)"}
    )
    prefill_addresses: tuple[str, ...] = field(metadata={"help": "host:port of each prefill worker"})
    decode_addresses: tuple[str, ...] = field(metadata={"help": "host:port of each decode worker"})
    model: str = field(
        default=DEFAULT_MODEL_NAME, metadata={"help": "id of the served model, as ListModels reports it"}
    )
    max_model_len: int = field(
        default=0,
        metadata={"help": "context limit in tokens; longer prompts are refused (0: unknown, not checked)", "min": 0},
    )
    vocab_size: int = field(
        default=0, metadata={"help": "vocabulary size; prompt token ids are checked against it (0: unknown)", "min": 0}
    )
    default_max_tokens: int = field(
        default=16, metadata={"help": "max_tokens of a request that leaves it unset", "min": 1}
    )
    max_running_requests: int = field(
        default=256, metadata={"help": "requests routed to workers at once; more wait in the queue", "min": 1}
    )
    max_queue_requests: int = field(
        default=1024,
        metadata={"help": "requests waiting for a running slot; beyond this, RESOURCE_EXHAUSTED", "min": 0},
    )
    max_queue_tokens: int = field(
        default=1 << 20,
        metadata={"help": "tokens (prompt bound + max_tokens) the queued requests may hold together; beyond this, "
                  "RESOURCE_EXHAUSTED (0: no bound)", "min": 0},
    )
    max_client_requests: int = field(
        default=0,
        metadata={"help": "running + queued requests one client may have; beyond this, RESOURCE_EXHAUSTED "
                  "(0: no per-client limit)", "min": 0},
    )
    client_id_metadata_key: str = field(
        default="x-client-id",
        metadata={"help": "call metadata naming the client for max_client_requests (absent: the peer's host)"},
    )
    retry_after_s: float = field(
        default=1.0, metadata={"help": "retry hint (trailing metadata retry-after-s) of a full gateway", "min": 0.0}
    )
    worker_retry: Literal["off", "before_output", "always"] = field(
        default="before_output",
        metadata={"help": "when a prefill or decode worker fails (UNAVAILABLE), run the request again elsewhere, "
                  "re-prefilling the tokens so far: off | before_output (only if the client has no token yet) | "
                  "always (also mid-stream; sampled, unseeded output may then differ from an unbroken run)"},
    )
    max_worker_retries: int = field(
        default=2, metadata={"help": "how many times one request may move to another worker", "min": 0}
    )
    rpc_timeout_s: float = field(
        default=30.0,
        metadata={"help": "timeout of each unary call to a worker (Tokenize, Reserve, Prefill, ...)", "min": 0.001},
    )
    stream_idle_timeout_s: float = field(
        default=60.0, metadata={"help": "longest wait for the next token event of a decode stream", "min": 0.001}
    )
    cancel_timeout_s: float = field(
        default=1.0, metadata={"help": "timeout of the Cancel calls that free an aborted request", "min": 0.001}
    )
    stats_poll_interval_s: float = field(
        default=0.5,
        metadata={
            "help": "seconds between Stats polls (routing load, and probes of workers out of rotation)",
            "min": 0.01,
        },
    )
    probe_timeout_s: float = field(
        default=5.0,
        metadata={
            "help": "timeout of a Stats/health probe (a busy worker answers late, so keep this well above a "
            "step's time)",
            "min": 0.001,
        },
    )
    probe_misses: int = field(
        default=3,
        metadata={
            "help": "probe timeouts in a row before a worker leaves rotation and its streams fail over (a "
            "refused connection takes it out at once)",
            "min": 1,
        },
    )
    kv_retries: int = field(
        default=1,
        metadata={"help": "times a request is prefilled again when decode rejects its KV as corrupt (checksum)",
                  "min": 0, "max": 5},
    )  # fmt: skip
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        for name in ("tokenizer_addresses", "prefill_addresses", "decode_addresses"):
            addresses = tuple(getattr(self, name))
            object.__setattr__(self, name, addresses)  # argparse and YAML hand over lists
            if not addresses or not all(addresses):
                raise InvalidArgumentError(name, "needs at least one non-empty host:port")
