"""LLMEngine.watch_layers: the hook behind layer-by-layer KV push (dummy:tiny on CPU, no gRPC)."""

from __future__ import annotations

import torch

from stageserve.engine.config import EngineConfig
from stageserve.engine.factory import create_engine
from stageserve.sample.params import SamplingParams


def test_watcher_sees_every_layer_once_in_order_on_the_step_that_completes_the_prompt():
    engine = create_engine("dummy:tiny", EngineConfig(device="cpu", dtype="float32", num_blocks=64, block_size=4,
                                                      max_num_batched_tokens=8))
    calls: list[tuple[int, list[int], int]] = []
    snapshots: dict[int, torch.Tensor] = {}

    def watcher(layer, block_ids):
        calls.append((layer, list(block_ids), engine.counters.steps))
        snapshots[layer] = engine.runner.read_kv(layer, block_ids).clone()  # what a transport would read now

    prompt = list(range(1, 19))  # 18 tokens: three chunks of at most 8
    engine.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), prefill_only=True)
    engine.watch_layers("p", watcher)
    engine.add_request("other", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    held = engine.held_block_ids("p")
    assert [layer for layer, _, _ in calls] == list(range(engine.model_config.num_layers))
    assert all(ids == held for _, ids, _ in calls)
    assert len({step for _, _, step in calls}) == 1  # one step: the one with the prompt's last chunk
    for layer, pages in snapshots.items():  # each layer was complete when its watcher ran
        assert torch.equal(pages, engine.runner.read_kv(layer, held))
    assert "p" not in engine.layer_watchers  # dropped once the prompt is held
    engine.release_held("p")


def test_an_aborted_prompt_drops_its_watcher():
    engine = create_engine("dummy:tiny", EngineConfig(device="cpu", dtype="float32", num_blocks=64))
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=1), prefill_only=True)
    engine.watch_layers("a", lambda layer, ids: None)
    engine.abort("a")
    assert engine.layer_watchers == {}
