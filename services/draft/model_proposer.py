"""A draft model as a proposer: greedy tokens from a small model with its own paged KV cache.

The default for the built-in model is a self-draft (layer skip): the target's first N layers, then
its final norm and LM head. Any model that shares the target's tokenizer also works (`layers=0`
keeps all of its layers).

Life of a sequence here (each one is an engine `Request` driven by the engine's own runner):

    propose(seq, new_tokens, k)   new_tokens (the whole history on the first call) join the history;
                                  the uncomputed tail is run as one prefill chunk, then k - 1 one-token
                                  steps, each taking the argmax; the k tokens are returned
    propose(seq, accepted + bonus, k)
                                  KV stays valid for the history plus the longest prefix of the new
                                  tokens that equals the last proposal (the accepted drafts); the
                                  rest is rolled back: num_computed_tokens moves back and blocks past
                                  it are freed. Rollback needs no Accept call, so a lost Accept is harmless.
    release(seq)                  blocks freed

`propose_batch` does the same for several sequences in one call (the Draft service's ProposeBatch): their
steps run together, so a round of B sequences costs about k forward passes, not B * k.

When the KV pool is full, the least recently used sequences are dropped (they restart from whatever
their next call sends, which after a reset is the whole history).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

import torch

from stageserve.common.errors import InvalidArgumentError
from stageserve.draft.ngram import MAX_K, DraftStats
from stageserve.engine.config import EngineConfig
from stageserve.engine.kv_cache_manager import KVCacheManager
from stageserve.engine.loader.weights import LoadedModel
from stageserve.engine.request import Request
from stageserve.engine.runner import ModelRunner
from stageserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from stageserve.sample.params import SamplingParams

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 30)


def truncate_layers(loaded: LoadedModel, num_layers: int) -> LoadedModel:
    """The first `num_layers` layers of a model, with its embeddings, final norm and head (0: all)."""
    if num_layers <= 0 or num_layers >= loaded.config.num_layers:
        return loaded
    keep = {
        name: t for name, t in loaded.state_dict.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < num_layers
    }  # fmt: skip
    config = dataclasses.replace(loaded.config, num_layers=num_layers, name=f"{loaded.config.name}[:{num_layers}]")
    return dataclasses.replace(loaded, config=config, state_dict=keep)


class ModelProposer:
    """Greedy drafting with a paged KV cache per sequence. Not thread-safe: one caller at a time."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, *, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.max_len = min(config.max_model_len or loaded.config.max_position_embeddings,
                           loaded.config.max_position_embeddings)  # fmt: skip
        self.kv = KVCacheManager(config.num_blocks, config.block_size, enable_prefix_caching=False)
        # The draft only decodes: no verify-step graphs for it, whatever the target's `speculative` says.
        plain = dataclasses.replace(config, speculative="none")
        self.runner = ModelRunner(loaded.config, plain, loaded.state_dict, device=device, dtype=dtype,
                                  max_model_len=self.max_len)  # fmt: skip
        self.vocab_size = loaded.config.vocab_size
        self.stats = DraftStats()
        self._seqs: OrderedDict[str, Request] = OrderedDict()  # least recently used first
        self.propose("__warmup__", [0, 1, 2, 3], 2)
        self.release("__warmup__")
        self.runner.capture_graphs()  # CUDA only: the one-token draft steps replay captured graphs

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def propose(self, seq_id: str, new_tokens: list[int], k: int) -> list[int]:
        (outcome,) = self.propose_batch([(seq_id, new_tokens, k)])
        if isinstance(outcome, InvalidArgumentError):
            raise outcome
        return outcome

    @torch.inference_mode()
    def propose_batch(self, items: Sequence[tuple[str, Sequence[int], int]]) -> list[list[int] | InvalidArgumentError]:
        """Propose for several sequences (distinct seq_ids) at once: a step runs the uncomputed tails (as
        many as fit the token budget; a tail longer than it runs alone), and each further draft position
        is one step over the sequences still drafting. An item with a bad field gets its
        InvalidArgumentError and leaves the others alone."""
        outcomes: list[list[int] | InvalidArgumentError] = []
        drafting: list[tuple[Request, int]] = []  # (sequence, k), in item order
        for seq_id, new_tokens, k in items:
            try:
                self._check(seq_id, new_tokens, k)
            except InvalidArgumentError as exc:
                outcomes.append(exc)
                continue
            request = self._touch(seq_id)
            self._extend(request, list(new_tokens))
            outcomes.append(request.output_token_ids)  # the proposal grows in place below
            drafting.append((request, k))
        batch = {request.request_id for request, _ in drafting}  # none of them may be evicted for another
        while drafting:
            scheduled, still, num_tokens = [], [], 0
            for request, k in drafting:
                if len(request.output_token_ids) >= k or request.num_tokens >= self.max_len or not request.prompt_token_ids:
                    continue
                num_new = request.num_tokens - request.num_computed_tokens
                if scheduled and num_tokens + num_new > self.config.max_num_batched_tokens:
                    still.append((request, k))  # its turn comes in a later step
                    continue
                block_ids = self._allocate(request, num_new, batch)
                if block_ids is None:
                    continue
                scheduled.append(ScheduledRequest(request, num_new, block_ids))
                still.append((request, k))
                num_tokens += num_new
            if not scheduled:
                break
            for s, (token,) in zip(scheduled, self.runner.execute(SchedulerOutput(scheduled)), strict=True):
                s.request.num_computed_tokens += s.num_new_tokens
                s.request.output_token_ids.append(token.token_id)
            drafting = still
        proposals = [outcome for outcome in outcomes if isinstance(outcome, list)]
        self.stats.num_proposals += len(proposals)
        self.stats.num_proposed_tokens += sum(len(p) for p in proposals)
        return [list(outcome) if isinstance(outcome, list) else outcome for outcome in outcomes]

    def _check(self, seq_id: str, new_tokens: Sequence[int], k: int) -> None:
        if not seq_id:
            raise InvalidArgumentError("seq_id", "must be non-empty")
        if not 1 <= k <= MAX_K:
            raise InvalidArgumentError("k", f"must be in [1, {MAX_K}], got {k}")
        for i, token in enumerate(new_tokens):
            if not 0 <= token < self.vocab_size:
                raise InvalidArgumentError(f"new_token_ids[{i}]", f"must be in [0, {self.vocab_size}), got {token}")

    def _extend(self, request: Request, new_tokens: list[int]) -> None:
        """Append confirmed tokens; keep the KV of the proposal's prefix they confirm, roll back the rest."""
        proposal, match = request.output_token_ids, 0
        while match < min(len(proposal), len(new_tokens)) and proposal[match] == new_tokens[match]:
            match += 1
        valid = min(request.num_computed_tokens, len(request.prompt_token_ids) + match)
        request.prompt_token_ids.extend(new_tokens)
        request.output_token_ids = []
        # The last token must be run again if it is the only one: its logits are what we sample from.
        request.num_computed_tokens = min(valid, request.num_tokens - 1)
        self.kv.trim(request, request.num_computed_tokens)

    def _allocate(self, request: Request, num_new: int, keep: set[str]) -> list[int] | None:
        """Blocks for `num_new` more tokens, evicting least recently used sequences not in `keep`; None if
        only those are left to evict."""
        while (block_ids := self.kv.allocate_slots(request, num_new)) is None:
            victim = next(iter(self._seqs))
            if victim in keep:
                return None
            self.release(victim)
            self.stats.num_evicted += 1
        return block_ids

    def accept(self, seq_id: str, num_accepted: int) -> None:
        """Statistics only: rollback happens on the next propose, from the tokens it carries."""
        if seq_id in self._seqs:
            self.stats.num_accepted_tokens += max(num_accepted, 0)

    def release(self, seq_id: str) -> bool:
        request = self._seqs.pop(seq_id, None)
        if request is None:
            return False
        self.kv.free(request)
        return True

    def _touch(self, seq_id: str) -> Request:
        request = self._seqs.get(seq_id)
        if request is not None:
            self._seqs.move_to_end(seq_id)
            return request
        request = self._seqs[seq_id] = Request(seq_id, [], _GREEDY)
        return request
