"""One streamed OpenAI completion, timed: time to first token, wall time, when each token arrived.

The same client measures layerline's stage 0 and llama.cpp's `llama-server`:
both stream `/v1/completions` as server-sent events, one chunk per token, and
end with a usage chunk when `stream_options.include_usage` is set.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from layerline.errors import LayerlineError


@dataclass
class RequestSample:
    """What one request took and returned."""

    prompt_index: int
    run: int  # 0.. for measured runs, -1 for a warm-up
    ttft_s: float  # request sent -> first token's text received
    wall_s: float  # request sent -> stream closed
    tokens: int  # completion tokens, as the server counts them
    arrivals: list[float] = field(default_factory=list)  # seconds after sending, one per token
    finish_reason: str | None = None
    text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] | None = None  # llama-server's own counters, when it sends them
    client: int = 0  # which of several concurrent clients sent it
    sent_at: float = 0.0  # time.perf_counter() when it was sent: orders requests of several clients

    @property
    def last_token_at(self) -> float:
        """time.perf_counter() when its last token arrived (the stream's end if none did)."""
        return self.sent_at + (self.arrivals[-1] if self.arrivals else self.wall_s)

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens over the whole request's wall time (what a client sees)."""
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time after the first."""
        span = self.wall_s - self.ttft_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0

    @property
    def speculative(self) -> dict[str, Any]:
        """layerline's `usage.speculative` (empty for other servers)."""
        return self.usage.get("speculative") or {}

    def to_json(self) -> dict[str, Any]:
        return {"prompt_index": self.prompt_index, "run": self.run, "client": self.client,
                "ttft_s": round(self.ttft_s, 5),
                "wall_s": round(self.wall_s, 5), "tokens": self.tokens,
                "tokens_per_s": round(self.tokens_per_s, 3),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
                "finish_reason": self.finish_reason, "usage": self.usage, "timings": self.timings,
                "arrivals_s": [round(t, 5) for t in self.arrivals], "text": self.text}


def stream_completion(client: httpx.Client, url: str, body: dict[str, Any], *, prompt_index: int,
                      run: int, timeout_s: float, client_index: int = 0) -> RequestSample:
    """POST `body` (streamed) to `url`/v1/completions and time every chunk."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    texts: list[str] = []
    arrivals: list[float] = []
    finish: str | None = None
    finish_at: float | None = None
    usage: dict[str, Any] = {}
    timings: dict[str, Any] | None = None
    started = time.perf_counter()
    try:
        with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout_s) as response:
            if response.status_code != 200:
                response.read()
                raise LayerlineError(f"{url}/v1/completions answered {response.status_code}: "
                                     f"{response.text[:500]}")
            for line in response.iter_lines():
                now = time.perf_counter() - started
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise LayerlineError(f"{url} failed mid-stream: {chunk['error']}")
                usage = chunk.get("usage") or usage
                timings = chunk.get("timings") or timings
                for choice in chunk.get("choices") or ():
                    if choice.get("text"):
                        texts.append(choice["text"])
                        arrivals.append(now)
                    if choice.get("finish_reason"):
                        finish, finish_at = choice["finish_reason"], now
    except httpx.HTTPError as exc:
        raise LayerlineError(f"request to {url}/v1/completions failed: {exc}",
                             hint="see the server's log in the output folder") from exc
    wall = time.perf_counter() - started
    tokens = int(usage.get("completion_tokens") or len(arrivals))
    if finish == "stop" and finish_at is not None and len(arrivals) == tokens - 1:
        arrivals.append(finish_at)  # the end-of-text token has no text of its own
    ttft = arrivals[0] if arrivals else wall
    return RequestSample(prompt_index, run, ttft, wall, tokens, arrivals, finish, "".join(texts), usage,
                         timings, client_index, started)
