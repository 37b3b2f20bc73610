"""`stageserve serve ROLE`: run one role's service as a process until it is told to stop.

The life of the process:
1. Build the role's config from its flags over `--config FILE` over the defaults (common/config.py).
2. Run the role's `serve(config)` as a task.
3. On SIGTERM or SIGINT cancel that task: the role's `serve` then stops its server gracefully (health
   turns NOT_SERVING first, then in-flight RPCs get `server.grace_s`), and the process exits 0.
   A second signal cancels the graceful stop too.
4. With `--parent-pid`, a watchdog thread sends this process SIGTERM when that parent dies, so a
   supervisor killed with SIGKILL leaves no orphans; if the event loop is stuck (a model still
   loading) the watchdog exits hard after `_ORPHAN_HARD_EXIT_S`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stageserve.common import tracing
from stageserve.common.config import add_dataclass_args, dataclass_from_args, load_config_file
from stageserve.common.errors import StageServeError
from stageserve.common.roles import Role, get_role

logger = logging.getLogger(__name__)

_PARENT_POLL_S = 0.5
_ORPHAN_HARD_EXIT_S = 30.0
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser(role: Role, config_class: type) -> argparse.ArgumentParser:
    """The role's own flags (derived from its config class) plus the process options."""
    doc = (config_class.__doc__ or "").strip().split("\n")[0]
    parser = argparse.ArgumentParser(prog=f"stageserve serve {role.name}", description=doc)
    parser.add_argument("--config", type=Path, default=None, help="YAML or TOML file of option values")
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="stop when this process exits (`stageserve up` sets it)"
    )
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=_LOG_LEVELS)
    parser.add_argument("--log-name", default=role.name, help="name shown in every log line (default: the role)")
    add_dataclass_args(parser, config_class)
    return parser


def configure_logging(name: str, level: str) -> None:
    """Log lines to stderr, each naming this process's role (or replica) so merged logs stay readable."""
    name = name.replace("%", "%%")
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
        force=True,
    )


def serve_role(role_name: str, argv: Sequence[str]) -> int:
    """Parse `argv` for `role_name`, serve until SIGTERM/SIGINT, and return the exit status."""
    role = get_role(role_name)
    config_class = role.config_class()
    args = build_parser(role, config_class).parse_args(list(argv))
    configure_logging(args.log_name, args.log_level)
    file_values = load_config_file(args.config) if args.config else None
    config = dataclass_from_args(config_class, args, file_values=file_values)
    if args.parent_pid is not None:
        if os.getppid() != args.parent_pid:
            logger.error("parent process %d is already gone; not starting", args.parent_pid)
            return 1
        _start_parent_watchdog(args.parent_pid)
    try:
        return asyncio.run(_serve_until_signal(role, config))
    except StageServeError as exc:
        logger.error("%s failed: %s", role.name, exc)
        return 1


async def _serve_until_signal(role: Role, config: Any) -> int:
    traces = tracing.configure(role.name)  # a no-op unless OTEL_EXPORTER_OTLP_ENDPOINT is set
    try:
        return await _serve(role, config)
    finally:
        traces.shutdown()  # flush the spans still queued


async def _serve(role: Role, config: Any) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(role.serve_function()(config), name=f"serve-{role.name}")
    signals: list[int] = []

    def on_signal(signum: int) -> None:
        signals.append(signum)
        name = signal.Signals(signum).name
        if len(signals) == 1:
            logger.info("%s received: stopping gracefully (signal again to stop at once)", name)
        else:
            logger.warning("%s received again: stopping now", name)
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await task
    except asyncio.CancelledError:
        if not signals:
            raise
        logger.info("%s stopped", role.name)
        return 0
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    logger.info("%s server stopped", role.name)
    return 0


def _start_parent_watchdog(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        logger.warning("parent process %d exited; stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(_ORPHAN_HARD_EXIT_S)
        logger.error("still running %.0fs after the parent exited; exiting now", _ORPHAN_HARD_EXIT_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
