"""One request's output text, grown a batch of tokens at a time through the stateless Detokenize call,
with stop strings applied. The gateway-side twin of `LLM._advance_text`, and it yields the same text.

The tokenizer keeps no state, so this object carries it: the two offsets, and a window of ids.
Detokenize only reads ids from `prefix_offset` on, so instead of resending the whole output each
call we keep just the window `ids[prefix_offset:]` (a few tokens) and shift the offsets to match;
a request costs O(new tokens) per call, not O(output length).

The window starts with the prompt's last few tokens, as `initial_offsets` prescribes, so the first
generated token decodes in context exactly as in-process.

The last call of a stream passes `final`, so a trailing incomplete character (a truncated emoji)
comes out as U+FFFD, exactly as the in-process LLM shows it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from stageserve.tokenizer.detokenize import find_stop, initial_offsets, stop_holdback, stop_search_start

# (ids, prefix_offset, read_offset, skip_special_tokens, final) -> (new text, prefix_offset, read_offset)
Detokenize = Callable[[Sequence[int], int, int, bool, bool], Awaitable[tuple[str, int, int]]]


class TextStream:
    """Incremental text of one output, holding back what could still become a stop string."""

    def __init__(
        self,
        prompt_token_ids: Sequence[int],
        stops: Sequence[str],
        skip_special_tokens: bool,
        detokenize: Detokenize,
    ):
        prefix_offset, read_offset = initial_offsets(prompt_token_ids)
        self._window = list(prompt_token_ids[prefix_offset:])
        self._prefix_offset = 0
        self._read_offset = read_offset - prefix_offset
        self._stops = tuple(stops)
        self._skip_special_tokens = skip_special_tokens
        self._detokenize = detokenize
        self.text = ""  # every character decoded so far (cut at a stop string once one matches)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False  # a stop string matched; the caller must end the request

    async def add(self, token_ids: Sequence[int], finished: bool) -> str:
        """Fold in new tokens (one Detokenize call for all of them); returns the text the client may now see.

        `finished`: the request ends with these tokens, so nothing is held back for stop strings.
        """
        if token_ids:
            self._window += token_ids
            new, prefix_offset, read_offset = await self._detokenize(
                self._window, self._prefix_offset, self._read_offset, self._skip_special_tokens, finished
            )
            del self._window[:prefix_offset]  # ids before the new prefix offset are never read again
            self._prefix_offset, self._read_offset = 0, read_offset - prefix_offset
            previous = len(self.text)
            self.text += new
            if self._stops and not self.stopped:
                cut = find_stop(self.text, self._stops, stop_search_start(previous, self._stops))
                if cut is not None:
                    self.text, self.stopped = self.text[:cut], True
        end = len(self.text)
        if self._stops and not (finished or self.stopped):
            end -= stop_holdback(self.text, self._stops)
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta
