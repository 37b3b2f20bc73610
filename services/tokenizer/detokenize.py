"""Stateless incremental detokenization and stop-string matching for streamed output.

Life of a stream:

1. `initial_offsets(prompt_ids)` gives `(prefix_offset, read_offset)`. The few prompt tokens before
   `read_offset` give the first generated token its left context: sentencepiece decoders drop the
   leading space of a window's first token, and a byte-level token can finish a character begun earlier.
2. After each new token, `detokenize_incrementally(tok, all_ids, prefix_offset, read_offset)` returns
   `(delta, prefix_offset, read_offset)`. It decodes the window `all_ids[prefix_offset:]`, subtracts what
   `all_ids[prefix_offset:read_offset]` already produced, and moves the offsets only when it emits text.
   The caller stores the two ints with the request and passes them back, so no replica keeps state and
   any replica can serve the next call.
3. Text ending in U+FFFD is an incomplete UTF-8 sequence (an emoji split over tokens) and is held back
   until a later token completes it; on the stream's last call pass `final=True` to flush it anyway.

Starting from offsets (0, 0), the deltas of a stream concatenate to `decode(all_ids)` (given `final=True`
on the last call, or a stream that does not end inside a character). This is the scheme of TGI's
`decode_token` and vLLM's `detokenize_incrementally`, over ids rather than tokens.

Stop strings: the engine appends each delta to the output text, calls `find_stop` over the part that
could hold a new match (`stop_search_start`), truncates there if found, and otherwise streams all but
the last `stop_holdback(text, stops)` characters, which could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from stageserve.tokenizer.text_tokenizer import TextTokenizer

# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: enough context for any prefix-dependent decoding.
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


def initial_offsets(prompt_token_ids: Sequence[int]) -> tuple[int, int]:
    """`(prefix_offset, read_offset)` for a fresh stream whose ids start with this prompt."""
    return max(len(prompt_token_ids) - PROMPT_CONTEXT_TOKENS, 0), len(prompt_token_ids)


def detokenize_incrementally(
    tokenizer: TextTokenizer,
    token_ids: Sequence[int],
    prefix_offset: int,
    read_offset: int,
    skip_special_tokens: bool = True,
    final: bool = False,
) -> tuple[str, int, int]:
    """`(new_text, prefix_offset, read_offset)` after the tokens appended since the last call.

    `token_ids` is the whole sequence so far (prompt and output). New text is empty while the window
    ends in an incomplete character, and the offsets then stay put so the next call retries it; `final`
    emits it regardless, as U+FFFD, the way a full `decode` would show it.
    """
    if not 0 <= prefix_offset <= read_offset <= len(token_ids):
        raise ValueError(f"need 0 <= prefix_offset {prefix_offset} <= read_offset {read_offset} <= {len(token_ids)}")
    prefix_text = tokenizer.decode(token_ids[prefix_offset:read_offset], skip_special_tokens)
    full_text = tokenizer.decode(token_ids[prefix_offset:], skip_special_tokens)
    if len(full_text) > len(prefix_text) and (final or not full_text.endswith(_REPLACEMENT_CHAR)):
        return full_text[len(prefix_text) :], read_offset, len(token_ids)
    return "", prefix_offset, read_offset


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index in `text` where the earliest stop string begins, searching from `start`; None if none does.

    The engine truncates its output at this index, so the stop string itself is never sent.
    """
    found = [i for i in (text.find(stop, start) for stop in stops if stop) if i >= 0]
    return min(found, default=None)


def stop_search_start(previous_length: int, stops: Sequence[str]) -> int:
    """Where to start `find_stop` after text grew from `previous_length` characters: a match wholly
    inside the old text was already ruled out, but one may straddle the old end."""
    longest = max((len(stop) for stop in stops), default=1)
    return max(previous_length - longest + 1, 0)


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` to keep unsent because they begin some stop string.

    For `text="Hello wor"` and `stops=["world"]` it is 3: if "ld" comes next the engine must be able to
    cut "wor" out. Call it after `find_stop` has found no complete match.
    """
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
