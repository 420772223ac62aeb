"""The engine stage 0's HTTP app serves: none while the pipeline comes up, then the real one.

HTTP answers from the start: /health says 503, and why, until every stage is ready (and
while a lost stage is replaced, or none could be), /v1/status and
the dashboard show each stage's progress (bytes, bytes/s, time left), and a generation
request gets 503 `model_loading` rather than a refused connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .frontend import Engine, Events, GenerationRequest
from .openai_schema import ApiError


class EngineSlot:
    def __init__(self, model_id: str, context_length: int, vocab_size: int,
                 status: Callable[[], dict[str, Any]], health: Callable[[], str],
                 confirm_health: Callable[[], tuple[str, str | None]]) -> None:
        self.model_id = model_id
        self.context_length = context_length
        self._vocab_size = vocab_size
        self._status = status
        self._health = health
        self._confirm_health = confirm_health
        self.engine: Engine | None = None

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size if self.engine is not None else self._vocab_size

    def _ready_engine(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, "stage 0 is still bringing up the pipeline; GET /v1/status shows how far "
                                "each stage has got", type="server_error", code="model_loading")
        return self.engine

    def encode(self, text: str) -> list[int]:
        return self._ready_engine().encode(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._ready_engine().encode_chat(messages)

    def generate(self, request: GenerationRequest) -> Events:
        return self._ready_engine().generate(request)

    def status(self) -> dict[str, Any]:
        return self._status()

    def is_ready(self) -> bool:
        return self.engine is not None and self.engine.is_ready()

    def health(self) -> str:
        """ok, or why the pipeline takes no requests (recovering, degraded, unavailable)."""
        return self._health()

    def confirm_health(self) -> tuple[str, str | None]:
        """health() after asking every stage for its claim now, and why it is not ok (None if it is)."""
        return self._confirm_health()
