"""The model's tokenizer: text to token ids and back, built from a GGUF file or a Hugging Face directory.

The ids must be exactly the ones the model was trained on, so the reference is transformers:
`AutoTokenizer.from_pretrained(dir, gguf_file=name)`. For a GGUF we rebuild the same `tokenizers.Tokenizer`
that transformers builds (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), without importing
transformers at serving time.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from stageserve.common.errors import InvalidArgumentError, ModelLoadError
from stageserve.tokenizer.chat_template import ChatTemplate

_VT = gguf.GGUFValueType
_SCALAR_FORMATS = MappingProxyType({
    _VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I", _VT.INT32: "i",
    _VT.FLOAT32: "f", _VT.BOOL: "?", _VT.UINT64: "Q", _VT.INT64: "q", _VT.FLOAT64: "d",
})  # fmt: skip

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}", 1)  # one digit per piece
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = _GPT4O_SPLIT.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)?", "").replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the split regex its merges were learned with, as transformers maps them. Any other
# name gets GPT-2's regex (the ByteLevel default), as in transformers. That includes the default model's
# "smollm", for which llama.cpp first splits off every `\p{N}` (like the original tokenizer.json's
# `Digits(individual_digits=True)`). The vocabulary has no multi-digit or space+digit token, so the two agree
# on "12345", " 3.14159", "x=1,000,000"; they differ only where 2+ whitespace characters precede a digit
# ("  42", "\n\n1": transformers `Ġ Ġ 4 2`, llama.cpp `ĠĠ 4 2`) and on some non-ASCII numerals (" ٤", "²³").
# We match transformers, the stated reference.
_SPLIT_BY_PRE = MappingProxyType(
    dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                   "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT)
    | dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT)
    | dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT)
    | {"tekken": _TEKKEN_SPLIT, "qwen35": _QWEN35_SPLIT}
)  # fmt: skip
# Sentencepiece files of these architectures need fixes transformers applies and we have not ported.
_UNSUPPORTED_SENTENCEPIECE_ARCHS = frozenset({"gemma", "gemma2", "gemma3", "phi3"})


@dataclass(frozen=True)
class TokenizerMetadata:
    """What a model file says beyond the vocabulary: which ids frame and end text, and the chat format."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    stop_token_ids: frozenset[int] = frozenset()  # ids that end generation: eos, plus eot/eom where declared
    chat_template: str | None = None


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the metadata the engine needs. Immutable and safe to share."""

    def __init__(self, backend: Tokenizer, metadata: TokenizerMetadata):
        self._backend = backend
        self._metadata = metadata

    @classmethod
    def from_gguf(cls, path: str | Path) -> TextTokenizer:
        """Build from the `tokenizer.*` metadata of a GGUF file, reading none of its tensors."""
        path = Path(path)
        fields = read_gguf_tokenizer_fields(path)
        kind, arch = fields["tokenizer.ggml.model"], fields.get("general.architecture")
        if kind not in ("gpt2", "llama") or (kind == "llama" and arch in _UNSUPPORTED_SENTENCEPIECE_ARCHS):
            raise ModelLoadError(f"{path}: tokenizer {kind!r} of architecture {arch!r} is not supported")
        try:
            backend = _backend_from_gguf(fields)
        except Exception as exc:  # tokenizers reports a bad vocabulary or merge as a plain Exception
            raise ModelLoadError(f"{path}: malformed tokenizer metadata ({exc!r})") from exc
        bos, eos = fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id")
        # llama.cpp also ends generation on the end-of-turn and end-of-message tokens where a file names them.
        stops = {fields.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")} - {None}
        template = fields.get("tokenizer.chat_template")
        return cls(backend, TokenizerMetadata(bos, eos, frozenset(stops), template))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> TextTokenizer:
        """Build from a directory holding `tokenizer.json`, and optionally `tokenizer_config.json`,
        `generation_config.json` (more stop ids) and `chat_template.jinja`."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(f"{path}: no tokenizer.json in this directory")
        try:
            backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a plain Exception for any parse error
            raise ModelLoadError(f"{path / 'tokenizer.json'}: cannot be parsed ({exc})") from exc
        config = _read_json(path / "tokenizer_config.json")
        bos = _token_id(backend, config.get("bos_token"))
        eos = _token_id(backend, config.get("eos_token"))
        generation_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        stops = frozenset(i for i in [eos, *extra] if isinstance(i, int))
        template = _chat_template_from(config.get("chat_template"))
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, TokenizerMetadata(bos, eos, stops, template))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in it (`<|im_start|>`) become their ids, as in HF;
        `add_special_tokens` adds the BOS/EOS framing the model file asks for."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; incomplete UTF-8 at either end comes out as U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, as HF's `apply_chat_template(..., tokenize=False)` renders it."""
        if self._compiled_template is None:
            raise InvalidArgumentError("messages", "this model has no chat template; send a plain prompt instead")
        bos, eos = self.bos_token_id, self.eos_token_id
        return self._compiled_template.render(
            messages,
            add_generation_prompt,
            bos_token=self.id_to_token(bos) if bos is not None else None,
            eos_token=self.id_to_token(eos) if eos is not None else None,
        )

    @cached_property
    def _compiled_template(self) -> ChatTemplate | None:
        # Compiled on first use: a broken template must not stop a model from serving plain prompts.
        source = self._metadata.chat_template
        return ChatTemplate(source) if source else None

    @property
    def bos_token_id(self) -> int | None:
        return self._metadata.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._metadata.eos_token_id

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._metadata.stop_token_ids

    @property
    def chat_template(self) -> str | None:
        return self._metadata.chat_template

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included (HF's `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that `decode(skip_special_tokens=True)` drops."""
        return frozenset(i for i, token in self._backend.get_added_tokens_decoder().items() if token.special)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id` (byte-level spelling for BPE), or None if out of range."""
        return self._backend.id_to_token(token_id)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer of a `.gguf` file or of a Hugging Face model directory."""
    path = Path(path)
    if path.is_dir():
        return TextTokenizer.from_hf_dir(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.suffix.lower() == ".gguf":
        return TextTokenizer.from_gguf(path)
    raise ModelLoadError(f"{path}: expected a .gguf file or a directory holding tokenizer.json")


def read_gguf_tokenizer_fields(path: Path) -> dict[str, Any]:
    """`general.architecture` and every `tokenizer.*` key of a GGUF file, as Python values.

    `gguf.GGUFReader` parses every field plus the tensor table into numpy views, one per vocabulary
    string: over 3 s for the 98 MB default model. This walks only the key-value section with `struct`
    over an mmap (so just the header pages are read from disk), in about 0.1 s.
    """
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            magic, version, _, kv_count = struct.unpack_from("<IIQQ", buf, 0)
            if magic != gguf.GGUF_MAGIC or version not in (2, 3):
                raise ValueError(f"not a little-endian GGUF v2/v3 file (magic {magic:#x}, version {version})")
            fields, pos = {}, 24
            for _ in range(kv_count):
                key, pos = _read_string(buf, pos)
                (value_type,) = struct.unpack_from("<I", buf, pos)
                value, pos = _read_value(buf, pos + 4, value_type)
                if key.startswith("tokenizer.") or key == "general.architecture":
                    fields[key] = value
    except (OSError, ValueError, struct.error) as exc:  # ValueError covers bad UTF-8 and an empty file
        raise ModelLoadError(f"{path}: cannot read GGUF metadata ({exc})") from exc
    if fields.get("tokenizer.ggml.model") is None or "tokenizer.ggml.tokens" not in fields:
        raise ModelLoadError(f"{path}: GGUF file has no tokenizer metadata")
    return fields


def _read_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + length
    if end > len(buf):
        raise ValueError("string runs past the end of the file")
    return buf[pos + 8 : end].decode("utf-8"), end


def _read_value(buf: mmap.mmap, pos: int, value_type: int) -> tuple[Any, int]:
    if value_type in _SCALAR_FORMATS:
        fmt = "<" + _SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if value_type == _VT.STRING:
        return _read_string(buf, pos)
    if value_type != _VT.ARRAY:
        raise ValueError(f"unknown GGUF value type {value_type}")
    element_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if element_type in _SCALAR_FORMATS:  # token types and scores: one struct call for the whole array
        fmt = f"<{count}{_SCALAR_FORMATS[element_type]}"
        return list(struct.unpack_from(fmt, buf, pos)), pos + struct.calcsize(fmt)
    values = []
    for _ in range(count):
        value, pos = _read_value(buf, pos, element_type)
        values.append(value)
    return values, pos


def _backend_from_gguf(fields: dict[str, Any]) -> Tokenizer:
    """The `tokenizers.Tokenizer` transformers builds for these fields: model, specials, framing."""
    kind, tokens = fields["tokenizer.ggml.model"], fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type") or []
    if kind == "gpt2":
        backend, spelled = _byte_level_backend(fields), set(_bytes_to_unicode().values())
    else:
        backend, spelled = _sentencepiece_backend(fields), None
    # CONTROL tokens are special. In a byte-level vocabulary one spelled outside the byte alphabet is a
    # llama.cpp mislabel that transformers skips. bos/eos/unk/pad are special too, as in HF's init.
    control = (t for t, k in zip(tokens, types) if k == gguf.TokenType.CONTROL)
    specials = [t for t in control if spelled is None or set(t) <= spelled]
    named = (fields.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "unknown", "padding"))
    specials += [tokens[i] for i in named if i is not None and backend.token_to_id(tokens[i]) is not None]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(specials)])
    # USER_DEFINED tokens (`<think>`) are matched whole in text but are not special.
    vocab = backend.get_vocab()
    user = [t for t, k in zip(tokens, types) if k == gguf.TokenType.USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise; transformers follows.
    add_bos = fields.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = fields.get("tokenizer.ggml.add_eos_token", False)
    backend.post_processor = _framing(fields, tokens, add_bos, add_eos)
    return backend


def _byte_level_backend(fields: dict[str, Any]) -> Tokenizer:
    """GPT-2 style byte-level BPE. Tokens a file spells as raw text are respelled in the byte alphabet."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(fields["tokenizer.ggml.tokens"])
    }
    merges = [tuple(m.split(" ")) for m in fields.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                            fuse_unk=False))  # fmt: skip
    split = _SPLIT_BY_PRE.get(fields.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(fields: dict[str, Any]) -> Tokenizer:
    """Sentencepiece BPE with byte fallback, as transformers' `LlamaTokenizer` (non-legacy) builds it."""
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in fields:
        merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, dict(zip(tokens, fields["tokenizer.ggml.scores"])))
    backend = Tokenizer(BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary: every split of a token into two known tokens, best
    token score first. A port of transformers' `generate_merges`, ties broken the same way."""
    merges = []
    for token, score in scores.items():
        splits = ((token[:i], token[i:]) for i in range(1, len(token)))
        local = [(left, right, score) for left, right in splits if left in vocab and right in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _framing(
    fields: dict[str, Any], tokens: list[str], add_bos: bool, add_eos: bool
) -> processors.PostProcessor | None:
    """The post-processor that adds BOS/EOS when `encode(add_special_tokens=True)` asks for framing."""
    bos, eos = fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id")
    head = [(tokens[bos], bos)] if add_bos and bos is not None else []
    tail = [(tokens[eos], eos)] if add_eos and eos is not None else []
    if not head and not tail:
        return None
    single = " ".join([*(f"{t}:0" for t, _ in head), "$A:0", *(f"{t}:0" for t, _ in tail)])
    return processors.TemplateProcessing(single=single, special_tokens=list(dict.fromkeys(head + tail)))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, the alphabet byte-level vocabularies use."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} if the file is absent: these config files are optional."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return value


def _token_id(backend: Tokenizer, token: object) -> int | None:
    """The id of a config's token entry, which is a string or an AddedToken dict (`{"content": ...}`)."""
    content = token.get("content") if isinstance(token, dict) else token
    return backend.token_to_id(content) if isinstance(content, str) else None


def _chat_template_from(value: object) -> str | None:
    """A config's `chat_template`: a string, or a list of `{"name", "template"}` from which we take "default"."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default", next(iter(named.values()), None))
    return value if isinstance(value, str) else None
