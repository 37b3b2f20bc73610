"""Rank 0's messages to the other ranks: a fixed int64 header, then int64 and uint8 payloads.

Every message is tensors on the `control` group (no pickle). Followers validate the header against
their own engine config before allocating anything, and a step's ids before they index memory.

    header [8] int64: op, a, b, c, d, e, int_payload_len, byte_payload_len
    STEP      a=num_tokens b=num_seqs c=max_blocks d=num_sample_rows
              ints: input_ids[a] positions[a] slots[a] block_tables[b*c] seq_lens[b] query_start_loc[b+1] sample_rows[d]
    READ_KV   a=layer b=num_blocks            ints: block_ids[b]; then each rank's pages are gathered to rank 0
    WRITE_KV  a=layer b=num_blocks            ints: block_ids[b]; bytes: every KV head's pages
    CAPTURE   capture the decode CUDA graphs (every rank captures the same buckets, in the same order)
    STOP      leave the loop
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from stageserve.common.errors import InvalidArgumentError
from stageserve.engine.config import EngineConfig

HEADER_LEN = 8


class Op(enum.IntEnum):
    STEP = 1
    READ_KV = 2
    WRITE_KV = 3
    CAPTURE = 4
    STOP = 5


@dataclass
class Message:
    op: Op
    args: list[int]  # a..e
    ints: torch.Tensor  # [int_payload_len] int64
    data: torch.Tensor  # [byte_payload_len] uint8

    def header(self) -> torch.Tensor:
        args = list(self.args) + [0] * (5 - len(self.args))
        return torch.tensor([int(self.op), *args, self.ints.numel(), self.data.numel()], dtype=torch.int64)


def step_message(host, sample_rows: list[int]) -> Message:
    """A `runner.HostBatch` plus the flat rows to project to logits, as one message."""
    n, (s, b) = host.input_ids.numel(), host.block_tables.shape
    ints = torch.cat([
        host.input_ids, host.positions, host.slots, host.block_tables.reshape(-1), host.seq_lens,
        torch.tensor(host.query_start_loc, dtype=torch.int64), torch.tensor(sample_rows, dtype=torch.int64),
    ])  # fmt: skip
    return Message(Op.STEP, [n, s, b, len(sample_rows)], ints, torch.empty(0, dtype=torch.uint8))


def parse_step(msg: Message, config: EngineConfig):
    """The inverse of `step_message`, after checking every size and id against this rank's config."""
    from stageserve.engine.runner import HostBatch

    n, s, b, r = msg.args[:4]
    if not (0 < n <= max(config.max_num_batched_tokens, config.max_num_seqs) and 0 < s <= n and b > 0 and 0 <= r <= s):
        raise InvalidArgumentError("step", f"sizes {msg.args[:4]} out of range")
    if msg.ints.numel() != 3 * n + s * b + s + s + 1 + r:
        raise InvalidArgumentError("step", "payload length does not match its sizes")
    input_ids, positions, slots, table, seq_lens, qsl, rows = msg.ints.split([n, n, n, s * b, s, s + 1, r])
    num_slots = config.num_blocks * config.block_size
    if (slots.min() < -1) or (slots.max() >= num_slots) or table.min() < 0 or table.max() >= config.num_blocks:
        raise InvalidArgumentError("step", "KV slot or block id out of range")
    if positions.min() < 0 or seq_lens.min() < 1 or (r and (rows.min() < 0 or rows.max() >= n)):
        raise InvalidArgumentError("step", "position, length or sample row out of range")
    qsl_host = qsl.tolist()
    if qsl_host[0] != 0 or qsl_host[-1] != n or any(x > y for x, y in zip(qsl_host, qsl_host[1:])):
        raise InvalidArgumentError("step", "query_start_loc is not a monotone split of the tokens")
    host = HostBatch(
        input_ids=input_ids.clone(), positions=positions.clone(), slots=slots.clone(),
        block_tables=table.reshape(s, b).clone(), seq_lens=seq_lens.clone(),
        query_start_loc=qsl_host, seq_lens_host=seq_lens.tolist(),
    )  # fmt: skip
    return host, rows.tolist()


def block_ids_message(op: Op, layer: int, block_ids: list[int], data: torch.Tensor | None = None) -> Message:
    ints = torch.tensor(block_ids, dtype=torch.int64)
    return Message(op, [layer, len(block_ids)], ints, data if data is not None else torch.empty(0, dtype=torch.uint8))


def parse_block_ids(msg: Message, config: EngineConfig, num_layers: int) -> tuple[int, list[int]]:
    layer, n = msg.args[:2]
    if not (0 <= layer < num_layers and 0 < n <= config.num_blocks and msg.ints.numel() == n):
        raise InvalidArgumentError("kv", f"layer {layer} / {n} blocks out of range")
    if msg.ints.min() < 0 or msg.ints.max() >= config.num_blocks:
        raise InvalidArgumentError("kv", "block id out of range")
    return layer, msg.ints.tolist()


class Channel:
    """Sends (rank 0) or receives (the others) messages over a communicator's control group."""

    def __init__(self, comm, max_bytes: int):
        self.comm, self.max_bytes = comm, max_bytes

    def send(self, msg: Message) -> None:
        self.comm.broadcast(msg.header())
        if msg.ints.numel():
            self.comm.broadcast(msg.ints.contiguous())
        if msg.data.numel():
            self.comm.broadcast(msg.data.contiguous())

    def receive(self) -> Message:
        header = self.comm.broadcast(torch.zeros(HEADER_LEN, dtype=torch.int64)).tolist()
        op, args, num_ints, num_bytes = header[0], header[1:6], header[6], header[7]
        if op not in Op._value2member_map_ or not (0 <= num_ints <= 1 << 24) or not (0 <= num_bytes <= self.max_bytes):
            raise InvalidArgumentError("header", f"bad control message header {header}")
        ints = self.comm.broadcast(torch.empty(num_ints, dtype=torch.int64)) if num_ints else torch.empty(0, dtype=torch.int64)
        data = self.comm.broadcast(torch.empty(num_bytes, dtype=torch.uint8)) if num_bytes else torch.empty(0, dtype=torch.uint8)
        return Message(Op(op), args, ints, data)
