"""Rendering a model's chat template: a list of messages in, one prompt string out.

A chat template is Jinja code that ships inside the model file, so it is untrusted: it runs in
`ImmutableSandboxedEnvironment`, which refuses dunder attribute access (`().__class__.__mro__`) and any
mutation of the objects it is handed. The environment mirrors the one transformers builds in
`apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, a non-escaping `tojson`,
`raise_exception`, `strftime_now`) so that prompts match the ones the model was tuned on, byte for byte.

Every failure is an `InvalidArgumentError`, since the request cannot be served as sent. A malformed
message names "messages", and so does an error the template raises at render time (nearly always
`raise_exception("Conversation roles must alternate ...")`). A template that does not compile or that
trips the sandbox names "chat_template".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from stageserve.common.errors import InvalidArgumentError

# The most items a template may build with one `*`, and the most bits one `**` may produce. The sandbox
# stops code execution but not resource use: without these, `{{ "a" * 10**10 }}` or `{{ 2 ** 10000000000 }}`
# hangs the renderer. Jinja bounds `range()` the same way (MAX_RANGE = 100000).
MAX_REPEAT_ITEMS = 100_000
MAX_POWER_BITS = 65_536


def _raise_exception(message: str) -> None:
    """Exposed to templates, which call it to reject a conversation they cannot format."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """Jinja's own `tojson` HTML-escapes `<>&'`, which would corrupt prompts; transformers overrides it too."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """Some templates (Llama 3.x) write today's date into the system prompt."""
    return datetime.now().strftime(fmt)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with `*` and `**` checked before they allocate."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, (str, list, tuple)) and isinstance(times, int)
                if sized and len(seq) * times > MAX_REPEAT_ITEMS:
                    raise SecurityError(f"repetition builds more than {MAX_REPEAT_ITEMS} items")
        elif isinstance(left, int) and isinstance(right, int) and right * abs(left).bit_length() > MAX_POWER_BITS:
            raise SecurityError(f"power has more than {MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Shallow copies of `messages`, after checking each is a dict with a string `role` and `content`.

    The copies keep the caller's list out of the template's reach, and the checks turn a malformed
    request into an error that names the field instead of a confusing template failure.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise InvalidArgumentError("messages", f"must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise InvalidArgumentError("messages", "must hold at least one message")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgumentError("messages", f"[{index}] must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InvalidArgumentError("messages", f"[{index}].{key} must be a string")
        checked.append(dict(message))
    return checked


class ChatTemplate:
    """One compiled chat template. Compile once per model, render once per request."""

    def __init__(self, source: str):
        env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise InvalidArgumentError("chat_template", f"does not compile: {exc}") from exc
        self.source = source

    def render(
        self,
        messages: object,
        add_generation_prompt: bool = True,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> str:
        """The prompt for `messages`; with `add_generation_prompt`, ending where the assistant's reply starts."""
        checked = validate_messages(messages)
        try:
            return self._template.render(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token or "",
                eos_token=eos_token or "",
            )
        except SecurityError as exc:
            raise InvalidArgumentError("chat_template", f"was stopped by the sandbox: {exc}") from exc
        # Beyond Jinja's own errors, a template can fail as plain Python would (`'a' + 1`, `x[5]`, deep
        # recursion); all of those are this input meeting this template, not a bug in the server.
        except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError, RecursionError) as exc:
            raise InvalidArgumentError("messages", f"rejected by the chat template: {exc}") from exc


def render_chat_template(
    source: str,
    messages: object,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """Compile and render in one call, for callers that render a template only once."""
    return ChatTemplate(source).render(messages, add_generation_prompt, bos_token, eos_token)
