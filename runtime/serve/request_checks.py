"""What an OpenAI request must satisfy before it runs: known fields, valid text and token ids,
and `max_tokens` that fits the context. Each failure is a 400 naming the field."""

from __future__ import annotations

from typing import Any

from .openai_schema import ApiError

# Fields OpenAI clients send that do not change what is generated: accepted and ignored.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
# Fields accepted only at the value that means "off" (any other value would change the output).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": ({}, None),
    "tools": ([], None),
    "tool_choice": ("none", "auto", None),
    "functions": ([], None),
    "function_call": ("none", None),
    "response_format": ({"type": "text"}, None),
    "best_of": (1, None),
    "suffix": ("", None),
    "echo": (False, None),
    "modalities": (["text"], None),
}


def check_fields(body: Any) -> None:
    """Refuse a field this server does not implement (unless it is set to its neutral value)."""
    extra = dict(body.model_extra or {})
    for name in ("echo",):  # declared on the completions body, but only `false` is served
        if getattr(body, name, None) not in (None, False):
            extra[name] = getattr(body, name)
    for name, value in extra.items():
        if name in IGNORED_FIELDS:
            continue
        if name in NEUTRAL_VALUES and value in NEUTRAL_VALUES[name]:
            continue
        only = f" (only {NEUTRAL_VALUES[name][0]!r}, which changes nothing)" if name in NEUTRAL_VALUES else ""
        raise ApiError(400, f"{name} is not supported by this server{only}", param=name,
                       code="unsupported_parameter")


def check_text(text: str, param: str) -> None:
    """Refuse text that is not valid Unicode (e.g. a lone surrogate from `\\ud800` in JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param} is not valid Unicode text: {exc.reason} at character {exc.start}",
                       param=param, code="invalid_text") from exc


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Refuse token ids the model has no embedding for."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"prompt token id {bad} is outside the vocabulary (0 to {vocab_size - 1})",
                       param="prompt", code="invalid_token_id")


def completion_budget(prompt_tokens: int, asked: int | None, context_length: int) -> int:
    """Tokens the request may generate: `asked` (if it fits the context), else all that fit."""
    room = context_length - prompt_tokens
    if room <= 0:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the context length is "
                            f"{context_length}", param="messages", code="context_length_exceeded")
    if asked is not None and asked > room:
        raise ApiError(400, f"max_tokens {asked} does not fit: the prompt has {prompt_tokens} tokens and "
                            f"the context length is {context_length}, so at most {room} can be generated",
                       param="max_tokens", code="context_length_exceeded")
    return asked or room
