"""OpenAI-compatible request bodies, validated into one plain GenerationRequest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from layerline.packager.window_spec import WindowError, check_window_size

MAX_STOP_STRINGS = 4
JSON_KINDS = {dict: "an object", list: "an array", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}  # what a parsed JSON value that is not a string was


class ApiError(Exception):
    """An error the HTTP layer returns as an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class SpeculativeOverride(BaseModel):
    """Per-request speculation override (a layerline extension)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None
    window: int | None = None  # a fixed draft window for this request

    @field_validator("window")
    @classmethod
    def _window_in_range(cls, window: int | None) -> int | None:
        if window is not None:
            try:
                check_window_size(window)
            except WindowError as exc:
                raise ValueError(str(exc)) from exc
        return window


class _Sampling(BaseModel):
    # Unknown fields are kept (`model_extra`) so that request_checks can refuse them by name.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    speculative: SpeculativeOverride | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stop


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self, where: str) -> str:
        """The message's text (text parts joined; other parts are refused); `where` names its content."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text":
                raise ApiError(400, f"message content of type {part.get('type')!r} is not supported; "
                                    "this model reads text only", param="messages")
            text = part.get("text", "")
            if not isinstance(text, str):
                raise ApiError(400, f"{where}[{i}].text must be a string, not {JSON_KINDS[type(text)]}",
                               param=f"{where}[{i}].text", code="invalid_type")
            parts.append(text)
        return "".join(parts)


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        return prompt


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """What the engine generates from: token ids and settings, no HTTP left in it."""

    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the top k
    speculative: SpeculativeOverride | None = None


def sampling_of(body: _Sampling) -> SamplingSettings:
    return SamplingSettings(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                            min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                            seed=body.seed)


def stop_list(body: _Sampling) -> list[str]:
    if body.stop is None:
        return []
    return [body.stop] if isinstance(body.stop, str) else list(body.stop)
