"""Tensor-parallel sharding math, the vocab-parallel layers on two in-process gloo ranks, and shard loading."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch

from stageserve.common.errors import InvalidArgumentError
from stageserve.engine.config import EngineConfig
from stageserve.engine.loader.dummy import DUMMY_SHAPES, load_dummy
from stageserve.engine.loader.weights import load_model
from stageserve.engine.parallel.comm import TPCommunicator, open_store
from stageserve.engine.parallel.launch import leader_rank, rank_devices
from stageserve.engine.parallel.layers import VocabParallelEmbedding, VocabParallelHead
from stageserve.engine.parallel.sharding import ModelShard, TPRank, gather_kv_heads, local_kv_heads


def shards(shape: str, size: int) -> list[ModelShard]:
    return [ModelShard(DUMMY_SHAPES[shape], r, size) for r in range(size)]


@pytest.mark.parametrize("shape, size", [("llama-3-8b", 2), ("llama-3-8b", 8), ("llama-3-70b", 4), ("llama-3-70b", 8)])
def test_even_split_shapes(shape, size):
    c = DUMMY_SHAPES[shape]
    for s in shards(shape, size):
        local = s.local_config()
        assert local.num_heads == c.num_heads // size and local.num_kv_heads == c.num_kv_heads // size
        assert local.intermediate_size == c.intermediate_size // size
        assert local.vocab_size * size >= c.vocab_size > local.vocab_size * (size - 1)
        assert (local.hidden_size, local.head_dim, local.num_layers) == (c.hidden_size, c.head_dim, c.num_layers)
        assert s.region("model.layers.3.self_attn.q_proj.weight", (c.num_heads * c.head_dim, c.hidden_size)).start == (
            s.rank * local.num_heads * c.head_dim
        )


@pytest.mark.parametrize("shape, size", [("llama-3-8b", 16), ("llama-3-70b", 32), ("tiny-qwen2", 2), ("tiny-qwen2", 4)])
def test_fewer_kv_heads_than_ranks_replicates_them(shape, size):
    c = DUMMY_SHAPES[shape]
    replicas = size // c.num_kv_heads
    group = c.num_heads // c.num_kv_heads
    for s in shards(shape, size):
        assert s.kv_heads_per_rank == 1 and s.kv_replicas == replicas
        assert s.kv_head_start == s.rank // replicas
        # Every query head of the rank reads the one KV head it holds.
        q_heads = range(s.q_head_start, s.q_head_start + s.heads_per_rank)
        assert {h // group for h in q_heads} == {s.kv_head_start}
    assert shards(shape, size)[0].kv_owner_ranks() == list(range(0, size, replicas))


def test_uneven_kv_groups_split_as_evenly_as_possible():
    default = dataclasses.replace(DUMMY_SHAPES["smollm2-135m"], name="smollm2")  # 9 heads, 3 KV heads
    parts = [ModelShard(default, r, 2) for r in range(2)]
    assert [(p.kv_head_start, p.kv_heads_per_rank, p.q_head_start, p.heads_per_rank) for p in parts] == [(0, 1, 0, 3), (1, 2, 3, 6)]
    assert not parts[0].is_even and ModelShard(default, 0, 3).is_even


@pytest.mark.parametrize(
    "change, size, message",
    [
        ({"num_kv_heads": 2, "num_heads": 8, "intermediate_size": 96}, 3, "KV heads must divide the ranks"),
        ({"num_kv_heads": 2, "num_heads": 6, "intermediate_size": 96}, 4, "ranks the heads"),
        ({"intermediate_size": 101}, 2, "does not divide the intermediate size 101"),
    ],
)
def test_sizes_that_do_not_split_are_named(change, size, message):
    base = dataclasses.replace(DUMMY_SHAPES["tiny"], **change)
    with pytest.raises(InvalidArgumentError, match=message) as info:
        ModelShard(base, 0, size)
    assert info.value.field == "tensor_parallel_size"


def test_rank_and_size_bounds():
    with pytest.raises(InvalidArgumentError):
        TPRank(2, 2)
    with pytest.raises(InvalidArgumentError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)


def test_more_ranks_than_gpus_fails_before_loading():
    visible = torch.cuda.device_count()
    with pytest.raises(InvalidArgumentError, match=f"need {visible + 1} GPUs, but {visible} are visible"):
        rank_devices(torch.device("cuda"), visible + 1)
    with pytest.raises(InvalidArgumentError, match="need"):
        leader_rank(EngineConfig(tensor_parallel_size=visible + 2, device="cuda"), torch.device("cuda"))
    assert leader_rank(EngineConfig(), torch.device("cpu")) is None
    assert rank_devices(torch.device("cpu"), 4) == [torch.device("cpu")] * 4


@pytest.mark.parametrize("shape, size", [("tiny", 2), ("tiny-qwen2", 2), ("tiny-qwen2", 4), ("tiny-gqa3", 2)])
def test_shards_reassemble_the_full_weights(shape, size):
    """Concatenating the ranks' slices (owners only for replicated KV heads) gives back every weight."""
    full = load_dummy(shape).state_dict
    parts = [s.shard_state_dict(full) for s in shards(shape, size)]
    owners = shards(shape, size)[0].kv_owner_ranks()
    vocab = DUMMY_SHAPES[shape].vocab_size
    for name, weight in full.items():
        if "norm" in name:
            assert all(torch.equal(p[name], weight) for p in parts)
            continue
        if "k_proj" in name or "v_proj" in name:
            pieces, dim = [parts[r][name] for r in owners], 0
        else:
            pieces, dim = [p[name] for p in parts], 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
        joined = torch.cat(pieces, dim)
        if "embed" in name or "lm_head" in name:
            assert not joined[vocab:].any()  # zero padding rows
            joined = joined[:vocab]
        assert torch.equal(joined, weight), name


@pytest.mark.parametrize("shape", ["tiny-qwen2", "tiny-gqa3"])
def test_dummy_rank_draws_only_its_slice_with_the_full_values(shape):
    full = load_dummy(shape).state_dict
    for rank in range(2):
        loaded = load_model(f"dummy:{shape}", tp=TPRank(rank, 2))
        expected = loaded.shard.shard_state_dict(full)
        assert loaded.state_dict.keys() == expected.keys()
        assert all(torch.equal(loaded.state_dict[k], expected[k]) for k in expected)


def test_hf_dir_reads_only_the_rank_slice(tmp_path):
    from safetensors.torch import save_file

    c = DUMMY_SHAPES["tiny-qwen2"]
    full = load_dummy("tiny-qwen2").state_dict
    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "tie_word_embeddings": False,
    }))  # fmt: skip
    loaded = load_model(str(tmp_path), tp=TPRank(1, 2))
    expected = loaded.shard.shard_state_dict(full)
    assert all(torch.equal(loaded.state_dict[k], expected[k]) for k in expected)
    assert loaded.state_dict["lm_head.weight"].shape == (255, 64)  # 509 rows split 255 + 254 (+1 zero row)


def test_kv_heads_gather_and_split_round_trip():
    for shape, size in [("tiny-qwen2", 4), ("tiny-gqa3", 2), ("tiny", 2)]:
        c = DUMMY_SHAPES[shape]
        pages = torch.randn(2, 3, 4, c.num_kv_heads, c.head_dim)  # [2, blocks, block_size, kv_heads, head_dim]
        per_rank = [local_kv_heads(pages, s) for s in shards(shape, size)]
        assert torch.equal(gather_kv_heads(per_rank, shards(shape, size)[0]), pages)


def run_ranks(size: int, fn) -> list:
    """Run fn(comm) on `size` gloo ranks in threads of this process: no global process group needed."""
    store = open_store(0, size)
    stores = [store] + [open_store(r, size, store.port) for r in range(1, size)]
    results, errors = [None] * size, []

    def target(rank):
        try:
            results[rank] = fn(TPCommunicator(stores[rank], rank, size, torch.device("cpu")))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_vocab_parallel_embedding_and_head_match_the_full_layers():
    vocab, hidden, size = 11, 8, 2  # 11 rows: shards of 6, the last padded with a zero row
    config = dataclasses.replace(DUMMY_SHAPES["tiny"], vocab_size=vocab, hidden_size=hidden, num_heads=2, head_dim=4, num_kv_heads=1)
    weight = torch.randn(vocab, hidden)
    ids = torch.tensor([0, 5, 6, 10, 3])
    hidden_states = torch.randn(5, hidden)

    def per_rank(comm):
        shard = ModelShard(config, comm.rank, size)
        local = shard.apply("model.embed_tokens.weight", weight)
        embed = VocabParallelEmbedding(torch.nn.Embedding.from_pretrained(local), comm, shard.vocab_start)
        head = torch.nn.Linear(hidden, local.shape[0], bias=False)
        head.weight.data = local
        return embed(ids), VocabParallelHead(head, comm, vocab)(hidden_states)

    for embedded, logits in run_ranks(size, per_rank):
        torch.testing.assert_close(embedded, weight[ids])
        torch.testing.assert_close(logits, hidden_states @ weight.T)


def step_batch(slots: list[int], table: list[list[int]]):
    from stageserve.engine.runner import HostBatch

    n = len(slots)
    return HostBatch(
        input_ids=torch.arange(n), positions=torch.arange(n), slots=torch.tensor(slots), block_tables=torch.tensor(table),
        seq_lens=torch.tensor([n]), query_start_loc=[0, n], seq_lens_host=[n],
    )  # fmt: skip


def test_step_message_round_trips_and_rejects_out_of_range_ids():
    from stageserve.engine.parallel.protocol import parse_step, step_message

    config = EngineConfig(num_blocks=8, block_size=4)
    host, rows = parse_step(step_message(step_batch([4, 5, 6], [[1, 0]]), [2]), config)
    assert host.slots.tolist() == [4, 5, 6] and host.block_tables.tolist() == [[1, 0]] and rows == [2]
    assert host.query_start_loc == [0, 3] and host.seq_lens_host == [3]
    for slots, table, sample in [([4, 5, 32], [[1, 0]], [2]), ([4, 5, 6], [[8, 0]], [2]), ([4, 5, 6], [[1, 0]], [3])]:
        with pytest.raises(InvalidArgumentError, match="out of range"):
            parse_step(step_message(step_batch(slots, table), sample), config)
    msg = step_message(step_batch([4, 5, 6], [[1, 0]]), [2])
    msg.ints = msg.ints[:-1]
    with pytest.raises(InvalidArgumentError, match="payload length"):
        parse_step(msg, config)
