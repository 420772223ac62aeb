"""Stage 0's HTTP connections, bounded: a whole-header deadline and a cap on open connections.

uvicorn waits for a request's header as long as the client keeps the connection open, and
accepts every connection: 2300 connections that each send half a header exhaust the file
descriptors and a legitimate request hangs. `GuardedH11Protocol` (uvicorn's h11 protocol,
passed as its `http` class) closes a connection whose request header has not arrived whole
within `header_timeout_s` of the connection (or of the last response on a kept-alive one), and
answers a connection past `max_connections` at once with a 503 in OpenAI's error shape,
then closes it.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("layerline.serve")

DEFAULT_HEADER_TIMEOUT_S = 10.0  # a request header must arrive whole within this
DEFAULT_MAX_HTTP_CONNECTIONS = 512  # open HTTP connections; the next gets a 503 and is closed


def _busy_response() -> bytes:
    body = json.dumps({"error": {"message": "stage 0 holds its most HTTP connections; retry shortly",
                                 "type": "server_error", "param": None,
                                 "code": "too_many_connections"}}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    return head + body


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with these limits (uvicorn.Config(http=...))."""

    class GuardedH11Protocol(H11Protocol):
        _header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("event=http_connection_refused open=%d limit=%d", len(self.connections),
                            max_connections)
                transport.write(_busy_response())
                transport.close()
                return
            self._arm_header_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm_header_deadline()  # the header is in: the request runs

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()  # a kept-alive connection's next header, too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            self._header_deadline = self.loop.call_later(header_timeout_s, self._header_too_slow)

        def _disarm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _header_too_slow(self) -> None:
            self._header_deadline = None
            if self.cycle is None or self.cycle.response_complete:
                log.info("event=http_header_timeout client=%s seconds=%.0f", self.client, header_timeout_s)
                self.transport.close()

    return GuardedH11Protocol

