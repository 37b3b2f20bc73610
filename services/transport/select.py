"""Which KV transport a worker serves: `auto` picks by device, an explicit name is checked up front.

    auto on CUDA: cuda-ipc (same host), then nccl (if libnccl loads), then host; the receiver picks per
                  reservation, and a sender on another host falls back to host for a cuda-ipc descriptor
    auto on CPU:  host, with a log line saying so
    cuda-ipc / nccl on a CPU-only worker, or nccl without libnccl: a clear error at start-up
"""

from __future__ import annotations

import logging
import socket
from functools import lru_cache
from typing import Literal

import torch

from stageserve.common.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

TransportChoice = Literal["auto", "host", "cuda-ipc", "nccl"]
GPU_TRANSPORTS = ("cuda-ipc", "nccl")


@lru_cache(maxsize=1)
def host_id() -> str:
    """This machine's identity for cuda-ipc: the kernel boot id (unique per boot), else the hostname."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{socket.gethostname()}/{f.read().strip()}"
    except OSError:
        return socket.gethostname()


def nccl_available() -> bool:
    from stageserve.transport.nccl import find_libnccl

    return find_libnccl() is not None


def served_transports(requested: str, device: torch.device, tensor_parallel_size: int = 1) -> tuple[str, ...]:
    """The transports this worker serves, best first; `host` is always last, as the fallback.

    With tensor parallelism each rank's pool holds only its KV heads, and the GPU transports move one
    pool, so only `host` (which gathers every head through rank 0) is served.
    """
    if tensor_parallel_size > 1 and requested != "host":
        if requested != "auto":
            raise InvalidArgumentError(
                "kv_transport", f"{requested} moves one GPU's pool, but tensor_parallel_size={tensor_parallel_size} "
                "spreads the KV heads over several; use --kv-transport host (or auto)",
            )
        logger.info("kv transport auto with tensor parallelism: KV pages move over the host transport")
        return ("host",)
    if requested == "auto":
        if device.type != "cuda":
            logger.info("kv transport auto: the engine runs on %s, so KV pages move over the host transport", device)
            return ("host",)
        served = ("cuda-ipc", "nccl", "host") if nccl_available() else ("cuda-ipc", "host")
        logger.info("kv transport auto on %s: serving %s", device, ", ".join(served))
        return served
    if requested == "host":
        return ("host",)
    if requested not in GPU_TRANSPORTS:
        raise InvalidArgumentError("kv_transport", f"{requested!r} is not one of auto, host, cuda-ipc, nccl")
    if device.type != "cuda":
        raise InvalidArgumentError(
            "kv_transport", f"{requested} moves pages between GPUs, but this worker's engine runs on {device}; "
            "use --kv-transport host (or auto) on a CPU-only machine",
        )
    if requested == "nccl" and not nccl_available():
        raise InvalidArgumentError("kv_transport", "nccl: libnccl.so was not found (torch's nvidia-nccl package or the system's)")
    return (requested, "host")


def choose_for_peer(served: tuple[str, ...], offered: list[str], peer_host_id: str) -> str:
    """The receiver's choice for one reservation: the sender's most preferred transport we serve.

    `offered` empty means the sender did not say (the gateway does not know): then our own preference.
    cuda-ipc is skipped for a sender that named a different host.
    """
    candidates = offered or list(served)
    for name in candidates:
        if name not in served:
            continue
        if name == "cuda-ipc" and peer_host_id and peer_host_id != host_id():
            continue
        return name
    raise InvalidArgumentError("transports", f"none of {candidates} is served here ({', '.join(served)})")
