"""The tokenizer against its reference, transformers: same ids, same text, same prompts.

The default model's GGUF covers byte-level BPE; a tiny sentencepiece GGUF written here covers "llama".
Both HF tokenizers are loaded once per module, since loading is most of this file's run time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import numpy as np
import pytest

from stageserve.common.errors import InvalidArgumentError, ModelLoadError
from stageserve.engine.loader.default_model import default_model_path
from stageserve.tokenizer.chat_template import render_chat_template
from stageserve.tokenizer.detokenize import (
    detokenize_incrementally,
    find_stop,
    initial_offsets,
    stop_holdback,
    stop_search_start,
)
from stageserve.tokenizer.text_tokenizer import TextTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "if (a != b && c >= d) { y = {'k': [1, 2]}; }",
    "日本語のテキストと中文文本",
    "Ça va? naïve café, São Paulo, Übermaß",
    "emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "עברית ועربية",
    "12345",
    " 3.14159",
    "x=1,000,000",
    "In 2024 there were 365 days; 0.5e-3",
    "  42 and   7",  # 2+ whitespace before a digit: where llama.cpp's "smollm" split differs (we match HF)
    "a\n\n1 \t2",
    "١٢٣ ٤ ½ ²³ ①②",  # non-ASCII numerals: the other place llama.cpp's split differs
    "a    b\t\tc\n\n\nd",
    "trailing spaces   ",
    "\n",
    "   ",
    "",
    "<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more <|im_end|>",
]
CONVERSATIONS = {
    "system_and_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2? Answer with émoji 👍"},
    ],
    "user_only": [{"role": "user", "content": "Hi there"}],
    "multi_turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
}


@pytest.fixture(scope="module")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def hf_tok(model_path):
    return transformers.AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)


@pytest.fixture(scope="module")
def tok(model_path) -> TextTokenizer:
    return load_tokenizer(model_path)


def _write_gguf(path: Path, kind: str | None, tokens: list[str], types: list[int], scores=None, merges=None) -> None:
    """A GGUF holding just a tokenizer (and one tensor, which transformers wants to see)."""
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [("block_count", 1), ("context_length", 64), ("embedding_length", 8), ("head_count", 2),
                       ("feed_forward_length", 16), ("head_count_kv", 2), ("rope_dimension_count", 4)]:  # fmt: skip
        getattr(writer, f"add_{add}")(value)
    writer.add_layer_norm_rms_eps(1e-5)
    if kind is not None:
        writer.add_tokenizer_model(kind)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_sentencepiece_gguf(path: Path) -> None:
    """A tiny "llama" (sentencepiece) vocabulary: byte fallback, scored pieces, a user-defined token."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types, scores = [2, 3, 3] + [6] * 256, [0.0] * len(tokens)
    pieces = "▁ e t a o h l r s n i w d ▁t he ▁the ▁a ll ▁w or ld ▁h ell ▁hell ▁hello ▁wor ▁world in ▁in ▁is is é 中 文"
    for rank, piece in enumerate([*pieces.split(), "<think>"]):
        tokens.append(piece)
        types.append(4 if piece == "<think>" else 1)
        scores.append(-float(rank) if len(piece) > 1 else -100.0 - rank)
    _write_gguf(path, "llama", tokens, types, scores=scores)


@pytest.fixture(scope="module")
def sentencepiece_pair(tmp_path_factory) -> tuple[TextTokenizer, object]:
    folder = tmp_path_factory.mktemp("sp")
    _write_sentencepiece_gguf(folder / "sp.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file="sp.gguf")
    return load_tokenizer(folder / "sp.gguf"), hf


# --- token ids and text, against transformers ------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text, add_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_hf(tok, hf_tok, text):
    ids = hf_tok.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_random_text_and_ids_match_hf(tok, hf_tok):
    """Random mixes of what the split regex tells apart, and random ids (mostly invalid UTF-8 when joined)."""
    rng = random.Random(0)
    pieces = [*"0123456789", " ", "  ", "\n", "\t", "\r\n", "a", "Zé", "中", "😀", "'s", "'LL", ".", ",-", "٣", "²"]
    pieces += ["<|im_end|>", "<|im", "<think>"]
    texts = ["".join(rng.choices(pieces, k=rng.randint(1, 16))) for _ in range(400)]
    assert [tok.encode(t) for t in texts] == [hf_tok.encode(t, add_special_tokens=False) for t in texts]
    id_lists = [[rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 8))] for _ in range(200)]
    assert [tok.decode(ids) for ids in id_lists] == [hf_tok.decode(ids, skip_special_tokens=True) for ids in id_lists]


def test_special_tokens_in_text_map_to_their_ids(tok):
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == tok.bos_token_id == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == tok.eos_token_id == 2
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_metadata_matches_hf(tok, hf_tok):
    assert tok.vocab_size == len(hf_tok)
    assert tok.bos_token_id == hf_tok.bos_token_id
    assert tok.eos_token_id == hf_tok.eos_token_id
    assert tok.stop_token_ids == frozenset({hf_tok.eos_token_id})
    assert tok.special_token_ids == {i for i, t in hf_tok.added_tokens_decoder.items() if t.special}
    assert tok.special_token_ids >= set(hf_tok.all_special_ids)
    assert tok.chat_template == hf_tok.chat_template
    assert [tok.id_to_token(i) for i in (0, 28120, 49151)] == hf_tok.convert_ids_to_tokens([0, 28120, 49151])
    assert tok.id_to_token(10**6) is None


def test_split_regex_table_matches_transformers():
    """Each `tokenizer.ggml.pre` must split text as transformers does, or every id after it can differ."""
    from stageserve.tokenizer.text_tokenizer import _SPLIT_BY_PRE

    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    assert dict(_SPLIT_BY_PRE) == mapping.GGUF_PRE_TOKENIZER_SPLITS


@pytest.mark.parametrize("text", ["hello world", " hello  world", "the<think>is", "中文é x\n\tq", "", "<s>a</s>"])
def test_sentencepiece_gguf_matches_hf(sentencepiece_pair, text):
    ours, hf = sentencepiece_pair
    for add in (False, True):
        assert ours.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add)
    ids = hf.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_hf_dir_with_added_token_dicts(tmp_path, tok, hf_tok):
    hf_tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True, "__type": "AddedToken"},
        "eos_token": "<|im_end|>",
        "chat_template": [{"name": "default", "template": hf_tok.chat_template}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    from_dir = load_tokenizer(tmp_path)
    assert (from_dir.bos_token_id, from_dir.eos_token_id, from_dir.stop_token_ids) == (1, 2, frozenset({0, 2}))
    for text in TEXTS:
        assert from_dir.encode(text) == tok.encode(text)
    messages = CONVERSATIONS["user_only"]
    assert from_dir.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_bad_model_paths_raise_model_load_error(tmp_path, model_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with model_path.open("rb") as file:
        (tmp_path / "truncated.gguf").write_bytes(file.read(4096))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    (tmp_path / "dir_without_json").mkdir()
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "tokenizer.json").write_text("{not json")
    _write_gguf(tmp_path / "no_tokenizer.gguf", None, ["a"], [1])
    _write_gguf(tmp_path / "unsupported.gguf", "bert", ["<unk>", "<s>", "</s>"], [2, 3, 3])
    _write_gguf(tmp_path / "bad_merges.gguf", "gpt2", ["<unk>", "<s>", "</s>", "a"], [2, 3, 3, 1], merges=["a b"])
    names = ["missing.gguf", "junk.gguf", "empty.gguf", "truncated.gguf", "weights.bin", "dir_without_json",
             "bad_json", "no_tokenizer.gguf", "unsupported.gguf", "bad_merges.gguf"]  # fmt: skip
    for name in names:
        with pytest.raises(ModelLoadError):
            load_tokenizer(tmp_path / name)


# --- chat templates -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok, hf_tok, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_template_sees_bos_eos_and_tojson_does_not_escape():
    template = "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}{{ eos_token }}"
    out = render_chat_template(template, [{"role": "user", "content": "<b>&é"}], bos_token="<s>", eos_token="</s>")
    assert out == '<s>{"role": "user", "content": "<b>&é"}</s>'


@pytest.mark.parametrize(
    "template",
    [
        "{{ ().__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ raise_exception.__globals__['__builtins__']['open']('PWNED', 'w') }}",
        "{{ cycler.__init__.__globals__.os.popen('touch PWNED').read() }}",
        "{% set _ = messages.append({'role': 'x', 'content': 'y'}) %}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{% for m in messages %",
        '{{ "a" * 10**10 }}',  # resource bombs: the sandbox alone would hang on these
        "{{ [0] * 10**9 }}",
        "{{ 2 ** 100000000 }}",
    ],
)
def test_malicious_or_broken_template_is_rejected(tmp_path, monkeypatch, template):
    monkeypatch.chdir(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidArgumentError) as err:
        render_chat_template(template, messages)
    assert err.value.field == "chat_template"
    assert not (tmp_path / "PWNED").exists()
    assert messages == [{"role": "user", "content": "hi"}]


def test_template_raise_exception_names_messages():
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    with pytest.raises(InvalidArgumentError, match="system first") as err:
        render_chat_template(template, [{"role": "user", "content": "hi"}])
    assert err.value.field == "messages"


BAD_MESSAGES = [
    "hello", None, [], ["hello"], [{"content": "no role"}], [{"role": "user"}], [{"role": "user", "content": 5}],
    [{"role": None, "content": "x"}], [{"role": "user", "content": "ok"}, 7],
]  # fmt: skip


@pytest.mark.parametrize("messages", BAD_MESSAGES)
def test_bad_messages_raise_invalid_argument(tok, messages):
    with pytest.raises(InvalidArgumentError) as err:
        tok.apply_chat_template(messages)
    assert err.value.field == "messages"


# --- incremental detokenization -------------------------------------------------------------------------


def _stream(tokenizer, ids, prefix_offset=0, read_offset=0, step=1, skip_special_tokens=True):
    """Feed `ids[read_offset:]` `step` at a time, as the engine would; return the deltas."""
    deltas = []
    for end in range(read_offset + step, len(ids) + step, step):
        end = min(end, len(ids))
        delta, prefix_offset, read_offset = detokenize_incrementally(
            tokenizer, ids[:end], prefix_offset, read_offset, skip_special_tokens, final=end == len(ids)
        )
        deltas.append(delta)
    return deltas


STREAM_TEXTS = [
    "Hello 😀 world 👨‍👩‍👧‍👦!",
    "日本語 🇫🇷 café",
    "<|im_start|>assistant\n🎉 done<|im_end|>",
    "x=1,000,000 \n\n  ok",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_deltas_concatenate_to_decode(tok, text, step):
    ids = tok.encode(text)
    for skip in (True, False):
        deltas = _stream(tok, ids, step=step, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)


def test_emoji_split_across_tokens_is_held_back(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1 and tok.decode(ids[:1]).endswith("\ufffd")  # the case under test really occurs
    assert detokenize_incrementally(tok, ids[:1], 0, 0) == ("", 0, 0)
    assert detokenize_incrementally(tok, ids, 0, 0) == ("😀", 0, len(ids))


def test_final_call_flushes_incomplete_text(tok):
    ids = tok.encode("ok 😀")[:-1]
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) and deltas[-1].endswith("\ufffd")


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_after_prompt(tok, text):
    prompt = tok.encode(tok.apply_chat_template(CONVERSATIONS["user_only"]))
    ids = prompt + tok.encode(text)
    prefix_offset, read_offset = initial_offsets(prompt)
    assert (prefix_offset, read_offset) == (len(prompt) - 5, len(prompt))
    full, head = tok.decode(ids), tok.decode(prompt)
    assert full.startswith(head)
    assert "".join(_stream(tok, ids, prefix_offset, read_offset)) == full[len(head) :]


def test_sentencepiece_stream_keeps_word_spaces(sentencepiece_pair):
    ours, _ = sentencepiece_pair
    ids = ours.encode("hello world中文 is", add_special_tokens=True)
    assert "".join(_stream(ours, ids)) == ours.decode(ids) == "hello world中文 is"
    prompt = ours.encode("the", add_special_tokens=True)
    start = initial_offsets(prompt)
    assert "".join(_stream(ours, prompt + ours.encode(" hello world"), *start)) == " hello world"


def test_offsets_are_validated(tok):
    with pytest.raises(ValueError):
        detokenize_incrementally(tok, [1, 2], 2, 1)
    assert initial_offsets([]) == (0, 0) and initial_offsets([7, 8]) == (0, 2)


# --- stop strings -------------------------------------------------------------------------------------


def test_find_stop():
    assert find_stop("Hello world. Bye", ["Bye", "."]) == 11
    assert find_stop("Hello world", ["xyz"]) is None
    assert find_stop("a.b.c", ["."], start=2) == 3
    assert find_stop("abc", ["", "c"]) == 2
    assert find_stop("abc", []) is None


def test_stop_holdback():
    assert stop_holdback("Hello wor", ["world"]) == 3
    assert stop_holdback("Hello wor", ["world", "r"]) == 3  # a complete stop is find_stop's job
    assert stop_holdback("Hello", ["world"]) == 0
    assert stop_holdback("ab", ["abc", "bcd"]) == 2
    assert stop_holdback("x<|", ["<|im_end|>", "</s>"]) == 2
    assert stop_holdback("", ["abc"]) == 0


def test_stop_search_start():
    assert stop_search_start(10, ["abc", "de"]) == 8
    assert stop_search_start(1, ["abcdef"]) == 0
    assert stop_search_start(5, []) == 5


def test_streaming_with_stop_strings():
    """Chunks arrive, the engine sends all it safely can and cuts the output at the first stop."""
    stops = ["</answer>", "STOP"]
    chunks = ["The ans", "wer is 4", "2.</ans", "wer> trailing"]
    text, sent, stopped = "", 0, False
    for chunk in chunks:
        start = stop_search_start(len(text), stops)
        text += chunk
        cut = find_stop(text, stops, start)
        if cut is not None:
            text, stopped = text[:cut], True
            sent = len(text)
            break
        sent = max(sent, len(text) - stop_holdback(text, stops))
        assert "</" not in text[:sent]
    assert stopped and text[:sent] == "The answer is 42."
