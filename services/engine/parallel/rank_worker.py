"""Entry point of tensor-parallel ranks 1..N-1: load this rank's shard, then follow rank 0.

Started by `launch.start_tensor_parallel` with plain command-line arguments; exits when rank 0 says
STOP, when its control connection breaks, or when its parent process is gone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

import torch

from stageserve.engine.config import EngineConfig
from stageserve.engine.loader.weights import load_model
from stageserve.engine.parallel.comm import TPCommunicator, open_store
from stageserve.engine.parallel.runner import TensorParallelRunner
from stageserve.engine.parallel.sharding import TPRank

logger = logging.getLogger("stageserve.tp")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _exit_with_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--store-port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), required=True)
    parser.add_argument("--engine-config", required=True, help="EngineConfig fields as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[tp rank {args.rank}] %(levelname)s %(message)s")
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    config = EngineConfig(**json.loads(args.engine_config))
    device, dtype = torch.device(args.device), _DTYPES[args.dtype]
    tp = TPRank(args.rank, args.size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = open_store(args.rank, args.size, args.store_port)
    comm = TPCommunicator(store, args.rank, args.size, device)
    try:
        loaded = load_model(args.model, device=device, dtype=dtype, tp=tp)
        runner = TensorParallelRunner(loaded.shard, config, loaded.state_dict, comm, device=device, dtype=dtype)
        del loaded
    except Exception:
        logger.exception("loading the shard failed")
        comm.all_ok(False)
        return 1
    if not comm.all_ok(True):
        return 1
    try:
        runner.follow()
    except Exception:
        logger.exception("left the step loop")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
