"""Chat messages -> the model's real prompt, through the package's own jinja template.

Rendering goes through transformers' `apply_chat_template`, so a package's
template sees exactly what it sees under transformers (sandboxed jinja,
`tojson`, `raise_exception`, the special tokens).

A message's text is text, never control tokens: `<|im_end|><|im_start|>system` inside a user's
message must not open a system turn. Only the template's own text is tokenized with its
special tokens parsed; a message whose text spells one is rendered with a placeholder in its
place, and its text is tokenized with special tokens split into ordinary ones.
"""

from __future__ import annotations

import re
from typing import Any

from layerline.errors import ChatTemplateError, ContextLengthError
from layerline.packager.manifest import Manifest

Message = dict[str, Any]


def user_messages(text: str, system: str | None = None) -> list[Message]:
    """A one-turn conversation: an optional system message, then the user's text."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": text}]


def render_chat(tokenizer: Any, manifest: Manifest, messages: list[Message]) -> str:
    """The prompt text for `messages`, ending where the assistant's reply begins."""
    template = manifest.tokenizer.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError(
            f"package {manifest.model.id} has no chat template",
            hint="use --prompt with plain text, or rebuild the package from a source with a template",
        )
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja raises TemplateError and the template's own exceptions
        raise ChatTemplateError(
            f"the chat template of {manifest.model.id} failed to render the messages: {exc}",
            hint="check the roles and order of the messages this model's template accepts",
        ) from exc


def chat_prompt_tokens(tokenizer: Any, manifest: Manifest, messages: list[Message], *,
                       max_tokens: int | None = None) -> list[int]:
    """Token ids of the rendered chat (the template already holds any BOS it wants).

    With `max_tokens`, a text that has more tokens than that is refused (ContextLengthError)
    after tokenizing little more of it than those tokens take.
    """
    if not any(_control_tokens_in(tokenizer, m) for m in messages):
        text = render_chat(tokenizer, manifest, messages)
        return _encode(tokenizer, text, add_special_tokens=False, max_tokens=max_tokens)
    return _guarded_chat_tokens(tokenizer, manifest, messages, max_tokens)


_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")  # private-use characters no template writes


def _control_tokens_in(tokenizer: Any, message: Message) -> list[str]:
    """The special tokens whose text a message's text spells."""
    content = message.get("content")
    if not isinstance(content, str):
        return []
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content in content]


def _guarded_chat_tokens(tokenizer: Any, manifest: Manifest, messages: list[Message],
                         max_tokens: int | None) -> list[int]:
    """Token ids of a chat whose messages spell special tokens: the template's text with its
    special tokens, each message's text with them split into ordinary tokens."""
    guarded = [i for i, m in enumerate(messages) if _control_tokens_in(tokenizer, m)]
    stand_ins = [dict(m, content=f"\ue000{i}\ue001") if i in guarded else m for i, m in enumerate(messages)]
    text = render_chat(tokenizer, manifest, stand_ins)
    pieces = _PLACEHOLDER.split(text)  # template text, message index, template text, ...
    found = [int(i) for i in pieces[1::2]]
    if sorted(found) != guarded:
        first = guarded[0]
        raise ChatTemplateError(
            f"message {first}'s text spells the control token "
            f"{_control_tokens_in(tokenizer, messages[first])[0]!r}, and the chat template of "
            f"{manifest.model.id} changes message text, so it cannot be kept apart from the template's own",
            hint="remove control tokens from the message text")
    tokens: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            tokens += _encode(tokenizer, piece, add_special_tokens=False, max_tokens=max_tokens)
        else:
            tokens += _encode(tokenizer, messages[int(piece)]["content"], add_special_tokens=False,
                              max_tokens=max_tokens, split_special_tokens=True)
    if max_tokens is not None and len(tokens) > max_tokens:
        raise ContextLengthError(f"the prompt has more than {max_tokens} tokens, the most the context holds",
                                 hint="shorten the prompt")
    return tokens


def text_prompt_tokens(tokenizer: Any, text: str, *, max_tokens: int | None = None) -> list[int]:
    """Token ids of a plain prompt, with the special tokens the tokenizer adds (e.g. BOS)."""
    return _encode(tokenizer, text, add_special_tokens=True, max_tokens=max_tokens)


PREFIX_CHARS_PER_TOKEN = 8  # the first prefix checked holds this many characters per allowed token
_CUT_SLACK = 8  # tokens a cut through the text may add at its end


def _encode(tokenizer: Any, text: str, *, add_special_tokens: bool, max_tokens: int | None,
            split_special_tokens: bool = False) -> list[int]:
    if max_tokens is not None:
        # Prefixes growing 4x: a huge text is refused once a prefix is too long, not tokenized whole.
        size = max_tokens * PREFIX_CHARS_PER_TOKEN
        while size < len(text):
            if len(tokenizer.encode(text[:size], add_special_tokens=False)) > max_tokens + _CUT_SLACK:
                raise ContextLengthError(f"the prompt has more than {max_tokens} tokens, the most the "
                                         "context holds", hint="shorten the prompt")
            size *= 4
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens,
                                 split_special_tokens=split_special_tokens))
