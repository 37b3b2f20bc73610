"""What `stageserve up` starts: the cluster's options, and the services they add up to.

    tokenizer-0, [sample-0 with --sampler remote], draft-0, prefill-0..N-1, decode-0..M-1, gateway-0

in that order; the gateway is given every other address. Each role may also get a table of its own
options (from the `--config` file), which is passed to each of its replicas as that replica's config file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from stageserve.cluster.supervisor import ClusterError, ServiceSpec
from stageserve.common.roles import get_role


@dataclass(frozen=True)
class ClusterConfig:
    """A whole stageserve deployment on this machine, one process per service."""

    model: str | None = field(
        default=None,
        metadata={"help": "model for every service that loads one: a .gguf file or a Hugging Face directory; "
                  "none: the default model (SmolLM2-135M-Instruct)"},
    )  # fmt: skip
    host: str = field(default="127.0.0.1", metadata={"help": "address every service listens on"})
    gateway_port: int = field(
        default=50051, metadata={"help": "the gateway's port, the one clients dial; 0 picks a free one", "min": 0,
                                 "max": 65535}
    )  # fmt: skip
    prefill_replicas: int = field(default=1, metadata={"help": "prefill processes", "min": 1, "max": 64})
    decode_replicas: int = field(default=1, metadata={"help": "decode processes", "min": 1, "max": 64})
    sampler: Literal["local", "remote"] = field(
        default="local", metadata={"help": "sample inside decode (local) or in a separate sample service (remote)"}
    )
    kv_transport: Literal["auto", "host", "cuda-ipc", "nccl"] = field(
        default="auto",
        metadata={"help": "how KV pages move from prefill to decode: auto (cuda-ipc on one host's GPUs, else nccl, "
                  "else host; host on CPU), or one of them"},
    )  # fmt: skip
    startup_timeout_s: float = field(
        default=300.0, metadata={"help": "seconds every service together gets to become ready", "min": 1.0}
    )
    grace_s: float = field(
        default=10.0, metadata={"help": "seconds services get to drain on shutdown before they are killed", "min": 0.0}
    )
    trace: str | None = field(
        default=None,
        metadata={"help": "OTLP/gRPC endpoint (e.g. http://localhost:4317) every service sends its spans to; "
                  "sets OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_SERVICE_NAME in each one's environment"},
    )  # fmt: skip
    metrics: bool = field(
        default=False, metadata={"help": "serve Prometheus /metrics from every service, each on a free port"}
    )
    speculative: Literal["none", "ngram", "model"] = field(
        default="none", metadata={"help": "speculative decoding: decode verifies proposals of the draft service "
                                  "(ngram: prompt lookup; model: a self-draft of the model's first --draft-layers layers)"}
    )  # fmt: skip
    num_speculative_tokens: int = field(
        default=4, metadata={"help": "most draft tokens per sequence per step (adapts below it)", "min": 1, "max": 16}
    )
    draft_layers: int = field(
        default=8, metadata={"help": "--speculative model: layers of the self-draft", "min": 1}
    )


ConfigFields = Callable[[str], frozenset[str]]


def role_config_fields(role: str) -> frozenset[str]:
    """The top-level config fields of `role` (imports its module), or a ClusterError saying why not."""
    try:
        return get_role(role).config_fields()
    except ImportError as exc:
        raise ClusterError(f"cannot load the {role} service ({get_role(role).module}): {exc}") from exc


def plan_services(
    config: ClusterConfig,
    role_values: Mapping[str, Mapping[str, Any]] | None = None,
    config_fields: ConfigFields = role_config_fields,
) -> list[ServiceSpec]:
    """The services of `config`, in start order. `role_values` holds each role's extra config table.

    Options that not every version of a role has (kv_transport, draft_address) are passed only where
    `config_fields(role)` lists them; asking for a non-default transport a role lacks is an error.
    """
    role_values = role_values or {}

    def spec(role: str, index: int, **kwargs: Any) -> ServiceSpec:
        name = f"{role}-{index}"
        env = {}
        if config.trace:  # service.name is the role; the replica is the instance
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": config.trace, "OTEL_SERVICE_NAME": role,
                   "OTEL_RESOURCE_ATTRIBUTES": f"service.instance.id={name}"}  # fmt: skip
        return ServiceSpec(
            name, role, config_values=role_values.get(role, {}), env=env, metrics=config.metrics, **kwargs
        )

    specs = [spec("tokenizer", 0, args=_model_args("tokenizer", config.model))]
    if config.sampler == "remote":
        specs.append(spec("sample", 0, args=_model_args("sample", config.model)))
    # The draft always names the cluster's model (a model proposer loads it; ngram ignores it).
    draft_args = _model_args("draft", config.model)
    if config.speculative != "none":
        draft_args += ("--proposer", config.speculative, "--draft-layers", str(config.draft_layers))
    specs.append(spec("draft", 0, args=draft_args))

    engine_args = {role: _model_args(role, config.model) for role in ("prefill", "decode")}
    for role in ("prefill", "decode"):
        if "kv_transport" in config_fields(role):
            engine_args[role] += ("--kv-transport", config.kv_transport)
        elif config.kv_transport not in ("auto", "host"):
            raise ClusterError(f"--kv-transport {config.kv_transport}: the {role} service has no kv_transport option")
    decode_addresses: list[tuple[str, tuple[str, ...]]] = []
    if config.sampler == "remote":
        decode_addresses.append(("--sample-address", ("sample-0",)))
    if "draft_address" in config_fields("decode"):
        decode_addresses.append(("--draft-address", ("draft-0",)))

    if config.speculative != "none":
        engine_args["decode"] += (
            "--engine-speculative", config.speculative,
            "--engine-num-speculative-tokens", str(config.num_speculative_tokens),
        )  # fmt: skip
    prefills = [spec("prefill", i, args=engine_args["prefill"]) for i in range(config.prefill_replicas)]
    decodes = [
        spec("decode", i, args=engine_args["decode"], address_flags=tuple(decode_addresses))
        for i in range(config.decode_replicas)
    ]
    gateway = spec(
        "gateway",
        0,
        port=config.gateway_port,
        address_flags=(
            ("--tokenizer-addresses", ("tokenizer-0",)),
            ("--prefill-addresses", tuple(s.name for s in prefills)),
            ("--decode-addresses", tuple(s.name for s in decodes)),
        ),
    )
    return [*specs, *prefills, *decodes, gateway]


def _model_args(role: str, model: str | None) -> tuple[str, ...]:
    model_field = get_role(role).model_field
    if model is None or model_field is None:
        return ()
    return ("--" + model_field.replace("_", "-"), model)


def merge_values(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    """`low` updated by `high`, recursing into tables; keys spelled `block-size` count as `block_size`."""
    merged = {_key(k): v for k, v in low.items()}
    for key, value in high.items():
        key = _key(key)
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_values(merged[key], value)
        elif isinstance(value, Mapping):
            merged[key] = merge_values({}, value)
        else:
            merged[key] = value
    return merged


def _key(key: Any) -> str:
    return str(key).replace("-", "_")
