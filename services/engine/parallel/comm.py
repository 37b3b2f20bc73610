"""The private communicator of one tensor-parallel engine: two process groups over one TCP store.

No `init_process_group`: the groups are constructed directly on a store that rank 0 binds to
127.0.0.1 on a free port, so one process can hold several engines and one host several workers.

- `data` carries the model's collectives (the all-reduce after attention and after the MLP, the
  embedding's all-reduce and the logits' all-gather). NCCL on CUDA, so the collectives are captured
  in the decode CUDA graphs like any other kernel; gloo on CPU (tests).
- `control` (gloo, CPU tensors) carries rank 0's step messages to the other ranks and the KV pages
  of a transfer. Followers wait on it while the engine is idle, hence its very long timeout;
  a dead peer still shows at once, as a closed connection.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

_IDLE_TIMEOUT = timedelta(days=365)  # followers block on `control` for as long as the engine is idle


def open_store(rank: int, size: int, port: int = 0, connect_timeout_s: float = 120.0) -> dist.TCPStore:
    """Rank 0 binds a fresh port (read it back from `.port`); the others connect to it."""
    return dist.TCPStore(
        "127.0.0.1", port, size, is_master=rank == 0, timeout=timedelta(seconds=connect_timeout_s),
        wait_for_workers=False,
    )


class TPCommunicator:
    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device, data_timeout_s: float = 600.0):
        self.rank, self.size, self.device = rank, size, device
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, _IDLE_TIMEOUT)
        data_store = dist.PrefixStore("data", store)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timedelta(seconds=data_timeout_s)
            self.data = dist.ProcessGroupNCCL(data_store, rank, size, opts)
        else:
            self.data = dist.ProcessGroupGloo(data_store, rank, size, timedelta(seconds=data_timeout_s))

    # -- model collectives (device tensors; capturable on CUDA) ----------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over ranks, in place."""
        self.data.allreduce([x]).wait()
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[n, d] on each rank -> [n, size * d], rank 0's columns first."""
        out = torch.empty((self.size * x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
        self.data._allgather_base(out, x.contiguous()).wait()
        return out.view(self.size, x.shape[0], x.shape[1]).permute(1, 0, 2).reshape(x.shape[0], -1)

    # -- control (host tensors) -------------------------------------------------------------------

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` into every rank's `t` (same shape and dtype on all ranks), in place."""
        self.control.broadcast(t, 0).wait()
        return t

    def gather_bytes(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's uint8 `t` (same length everywhere) to rank 0; None on the other ranks."""
        opts = dist.GatherOptions()
        opts.rootRank = 0
        outs = [[torch.empty_like(t) for _ in range(self.size)]] if self.rank == 0 else []
        self.control.gather(outs, [t], opts).wait()
        return outs[0] if self.rank == 0 else None

    def all_ok(self, ok: bool) -> bool:
        """True on every rank iff every rank passed True: a start-up barrier that carries failure."""
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        self.control.allreduce([flag]).wait()
        return int(flag.item()) == 0
