"""The in-process text API and CLI: stop strings, streaming, and the --json contract."""

from __future__ import annotations

import json

import pytest

from stageserve.engine.llm import LLM
from stageserve.sample.params import SamplingParams


@pytest.fixture(scope="module")
def llm(default_weights, monkeypatch_module):
    # Reuse the session's weights instead of reading the GGUF again.
    monkeypatch_module.setattr("stageserve.engine.llm.load_model", lambda name, **_: default_weights)
    return LLM()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_streamed_text_equals_final_text(llm):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    chunks = [delta for _, delta in llm.stream("Tell me about the moon.", params, chat=True)]
    [final] = llm.generate(["Tell me about the moon."], params, chat=True)
    assert "".join(chunks) == final.text
    assert final.text == llm.tokenizer.decode(final.token_ids)


def test_stop_string_truncates_text_and_ends_request(llm):
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    [full] = llm.generate(["The days of the week are Monday,"], greedy)
    words = full.text.split()
    stop = words[2]  # a word that really occurs in the greedy continuation
    [stopped] = llm.generate(["The days of the week are Monday,"], SamplingParams(max_tokens=32, temperature=0.0, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text
    assert full.text.startswith(stopped.text)
    assert len(stopped.token_ids) < len(full.token_ids)
    assert not llm.engine.has_unfinished()


def test_raw_prompt_has_no_bos_and_chat_uses_template(llm):
    raw = llm.encode_prompt("Hello")
    assert raw == llm.tokenizer.encode("Hello")
    assert llm.tokenizer.bos_token_id not in raw
    chat = llm.encode_prompt("Hello", chat=True)
    assert llm.tokenizer.decode(chat, skip_special_tokens=False).startswith("<|im_start|>")


def test_cli_generate_local_json(capsys, monkeypatch, default_weights):
    from stageserve import cli

    monkeypatch.setattr("stageserve.engine.llm.load_model", lambda name, **_: default_weights)
    assert cli.main(["generate", "What is 2+2?", "--local", "--chat", "--json", "--max-tokens", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"prompt_token_ids", "token_ids", "text", "finish_reason"} <= out.keys()
    assert 1 <= len(out["token_ids"]) <= 8
