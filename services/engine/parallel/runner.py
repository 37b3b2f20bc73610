"""One rank's model runner. Rank 0 drives: it schedules, broadcasts each step's inputs, samples.

Life of a step across ranks (rank 0 is the engine's own thread; ranks 1.. run `follow()`):

    rank 0                                    rank r > 0
    ------                                    ----------
    scheduler.schedule() -> HostBatch
    lock; send STEP message      -- control -->  receive; validate
    forward_step (all-reduces, logits gather)  <-- data -->  forward_step (the same collectives)
    unlock; sample on full logits

KV reads and writes for a transfer arrive on other threads (the prefill and decode services); the
lock makes each message plus its collectives one unit, so followers, which handle messages strictly
in order, always meet rank 0 in the same collective. KV pages travel with every head, whatever the
TP size, so a transfer's wire format is independent of either side's TP size.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable

import torch

from stageserve.engine.config import EngineConfig
from stageserve.engine.parallel.comm import TPCommunicator
from stageserve.engine.parallel.layers import apply_tensor_parallel
from stageserve.engine.parallel.protocol import (
    Channel, Message, Op, block_ids_message, parse_block_ids, parse_step, step_message,
)  # fmt: skip
from stageserve.engine.parallel.sharding import ModelShard, gather_kv_heads, local_kv_heads
from stageserve.engine.runner import HostBatch, ModelRunner

logger = logging.getLogger(__name__)


class TensorParallelRunner(ModelRunner):
    def __init__(
        self,
        shard: ModelShard,
        engine_config: EngineConfig,
        state_dict: dict[str, torch.Tensor],  # this rank's slices, in HF naming
        comm: TPCommunicator,
        **kwargs,
    ):
        super().__init__(shard.local_config(), engine_config, state_dict, **kwargs)
        apply_tensor_parallel(self.model, comm, shard)
        self.shard, self.comm = shard, comm
        self.full_config = shard.config
        self.channel = Channel(comm, max_bytes=self._full_pages_bytes(engine_config.num_blocks))
        self._lock = threading.Lock()  # rank 0: one message and its collectives at a time
        self.children: list[subprocess.Popen] = []  # rank 0: the processes of ranks 1..size-1

    def _full_pages_bytes(self, num_blocks: int) -> int:
        c, m = self.config, self.full_config
        return 2 * num_blocks * c.block_size * m.num_kv_heads * m.head_dim * self.kv_caches[0].element_size()

    # -- rank 0 -----------------------------------------------------------------------------------

    def forward_step(
        self, host: HostBatch, sample_rows: list[int], on_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor | None:
        # No per-layer push under TP: a layer's pages are spread over the ranks, and reading them is a
        # collective that must not interleave with the step's own; the KV moves after the step instead.
        if self.shard.rank != 0:
            return super().forward_step(host, sample_rows)
        with self._lock:
            self._check_children()
            self.channel.send(step_message(host, sample_rows))
            return super().forward_step(host, sample_rows)

    def capture_graphs(self) -> None:
        if self.graphs is None:  # the same on every rank: same device type and config
            return
        with self._lock:
            self.channel.send(Message(Op.CAPTURE, [], torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.uint8)))
            super().capture_graphs()

    @torch.inference_mode()
    def read_kv(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        """Every KV head's pages: [2, len(block_ids), block_size, num_kv_heads (full), head_dim]."""
        with self._lock:
            self._check_children()
            self.channel.send(block_ids_message(Op.READ_KV, layer, block_ids))
            return self._gather_pages(layer, block_ids)

    @torch.inference_mode()
    def write_kv(self, layer: int, block_ids: list[int], pages: torch.Tensor) -> None:
        """`pages` hold every KV head; each rank keeps its own."""
        pages = pages.to("cpu", self.dtype).contiguous()
        with self._lock:
            self._check_children()
            self.channel.send(block_ids_message(Op.WRITE_KV, layer, block_ids, _as_bytes(pages)))
            super().write_kv(layer, block_ids, local_kv_heads(pages, self.shard))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the other ranks (rank 0 only); idempotent, and bounded by about 2 timeout_s + 5 s.

        STOP is a broadcast, which needs every rank: with one gone it is not sent, since gloo does not always
        fail a send to a dead peer at once (a CI run hung here for good). A rank that dies while it is sent
        leaves the sending thread behind after timeout_s; every rank is then terminated."""
        if not self.children:
            return
        with self._lock:
            if all(proc.poll() is None for proc in self.children):
                sender = threading.Thread(target=self._send_stop, name="tp-stop", daemon=True)
                sender.start()
                sender.join(timeout_s)
            stop_processes(self.children, timeout_s)
            self.children = []

    def _send_stop(self) -> None:
        try:
            self.channel.send(Message(Op.STOP, [], torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.uint8)))
        except RuntimeError:  # a rank gone meanwhile: its connection is closed
            pass

    def _check_children(self) -> None:
        for rank, proc in enumerate(self.children, start=1):
            if proc.poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} exited with code {proc.returncode}")

    def _gather_pages(self, layer: int, block_ids: list[int]) -> torch.Tensor | None:
        """Each rank's pages to rank 0, padded to the largest rank's head count (gloo gathers equal sizes)."""
        local = super().read_kv(layer, block_ids).cpu()  # [2, n, bs, kv_per_rank, hd]
        widest = list(local.shape)
        widest[3] = self.shard.max_kv_heads_per_rank
        padded = local.new_zeros(widest)
        padded[:, :, :, : local.shape[3]] = local
        parts = self.comm.gather_bytes(_as_bytes(padded))
        if parts is None:
            return None
        pages = [p.view(local.dtype).view(widest)[:, :, :, : self.shard.for_rank(r).kv_heads_per_rank] for r, p in enumerate(parts)]
        return gather_kv_heads(pages, self.shard)

    # -- ranks 1.. --------------------------------------------------------------------------------

    @torch.inference_mode()
    def follow(self) -> None:
        """Serve rank 0's messages until STOP. Any error ends the loop: the ranks cannot resync."""
        while True:
            msg = self.channel.receive()
            if msg.op is Op.STOP:
                return
            if msg.op is Op.STEP:
                super().forward_step(*parse_step(msg, self.config))
            elif msg.op is Op.CAPTURE:
                super().capture_graphs()
            elif msg.op is Op.READ_KV:
                self._gather_pages(*parse_block_ids(msg, self.config, self.full_config.num_layers))
            elif msg.op is Op.WRITE_KV:
                layer, block_ids = parse_block_ids(msg, self.config, self.full_config.num_layers)
                m = self.full_config
                shape = (2, len(block_ids), self.config.block_size, m.num_kv_heads, m.head_dim)
                pages = msg.data.view(self.dtype)
                if pages.numel() != torch.Size(shape).numel():
                    raise ValueError(f"WRITE_KV of {pages.numel()} elements, expected shape {shape}")
                super().write_kv(layer, block_ids, local_kv_heads(pages.view(shape), self.shard))


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def stop_processes(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Wait for each to exit (after STOP), then terminate what is left."""
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    terminate_processes(procs)


def terminate_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each live one, then SIGKILL what is still there after 5 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
