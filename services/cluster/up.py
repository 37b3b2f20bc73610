"""`stageserve up`: every service of a deployment as its own process on this machine, until Ctrl-C.

Options come from flags over a `--config` file (YAML or TOML) over the defaults. The file holds the
`ClusterConfig` options at its top level, a table per role (`tokenizer`, `sample`, `draft`, `prefill`,
`decode`, `gateway`) handed to each replica of that role as its own config file, and an `engine`
table for both prefill and decode (the `--engine-*` flags override it):

    decode_replicas: 2
    engine: {block_size: 32, num_blocks: 4096}
    gateway: {server: {grace_s: 30}}
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from stageserve.cluster.plan import ClusterConfig, merge_values, plan_services
from stageserve.cluster.supervisor import Cluster, run_until_signal
from stageserve.common.config import add_dataclass_args, dataclass_from_args, load_config_file
from stageserve.common.errors import InvalidArgumentError
from stageserve.common.roles import ROLE_NAMES
from stageserve.engine.config import EngineConfig

ENGINE_PREFIX = "engine-"  # the same spelling as the prefill and decode services' own --engine-* flags
ENGINE_ROLES = ("prefill", "decode")


def add_up_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None,
        help="YAML or TOML file: cluster options, a table per role, an `engine` table (see `stageserve.cluster.up`)",
    )  # fmt: skip
    add_dataclass_args(parser, ClusterConfig)
    add_dataclass_args(parser.add_argument_group("engine (prefill and decode)"), EngineConfig, prefix=ENGINE_PREFIX)


def cluster_from_args(args: argparse.Namespace) -> tuple[ClusterConfig, dict[str, dict[str, Any]]]:
    """The cluster's config, and the config table each role's replicas get."""
    file_values = merge_values({}, load_config_file(args.config)) if args.config else {}
    role_values = {role: file_values.pop(role) for role in ROLE_NAMES if role in file_values}
    for role, values in role_values.items():
        if not isinstance(values, dict):
            raise InvalidArgumentError(role, f"expected a table of {role} options, got {values!r}")
    file_engine = file_values.pop("engine", {})
    if not isinstance(file_engine, dict):
        raise InvalidArgumentError("engine", f"expected a table of engine options, got {file_engine!r}")
    config = dataclass_from_args(ClusterConfig, args, file_values=file_values)

    flag_engine = {
        f.name: getattr(args, f"engine_{f.name}")
        for f in dataclasses.fields(EngineConfig)
        if hasattr(args, f"engine_{f.name}")
    }
    if file_engine or flag_engine:
        # Check the shared table here, once, rather than in every replica.
        dataclass_from_args(EngineConfig, argparse.Namespace(), file_values=merge_values(file_engine, flag_engine))
        for role in ENGINE_ROLES:
            values = merge_values({"engine": file_engine}, role_values.get(role, {}))
            role_values[role] = merge_values(values, {"engine": flag_engine})
    return config, role_values


def run_up(args: argparse.Namespace) -> int:
    """Start the cluster, print the gateway's address once every service is ready, stop on a signal."""
    config, role_values = cluster_from_args(args)
    specs = plan_services(config, role_values)
    cluster = Cluster(specs, host=config.host, startup_timeout_s=config.startup_timeout_s, grace_s=config.grace_s)
    gateway = specs[-1].name
    cluster.announce(f"starting {len(specs)} services: {', '.join(s.name for s in specs)}")

    def on_ready() -> None:
        cluster.announce(f"stageserve is up: gateway on {cluster.address(gateway)} (Ctrl-C stops every service)")

    status = run_until_signal(cluster, on_ready)
    cluster.announce("stageserve is down" if status == 0 else "stageserve is down after an error")
    return status
