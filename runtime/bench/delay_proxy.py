"""A TCP proxy that delays every byte by a fixed one-way latency, to emulate a link.

This kernel has no `netem` qdisc, so the benchmark puts one of these between
stages on loopback. Each direction of each connection is a queue of
(deliver_at, bytes): bandwidth is untouched, latency is added once per segment.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("layerline.delay_proxy")


@dataclass(frozen=True)
class ProxyAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class ProxyTraffic:
    """What went through a proxy: proof that a link was really delayed."""

    connections: int = 0
    bytes_to_target: int = 0  # client -> target
    bytes_from_target: int = 0  # target -> client

    def to_json(self) -> dict[str, int]:
        return {"connections": self.connections, "bytes_to_target": self.bytes_to_target,
                "bytes_from_target": self.bytes_from_target}


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
                count: Callable[[int], None]) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(deliver())
    try:
        while chunk := await reader.read(1 << 16):
            count(len(chunk))
            queue.put_nowait((time.monotonic() + delay_s, chunk))
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            queue.put_nowait((0.0, b""))
            await sender
        except (ConnectionError, RuntimeError):
            pass  # the peer or the proxy's loop is already gone


class DelayProxy:
    """Listens on a free loopback port and forwards to `target` with `delay_ms` each way."""

    def __init__(self, target: str, delay_ms: float, listen_host: str = "127.0.0.1") -> None:
        host, _, port = target.rpartition(":")
        self.target = ProxyAddress(host, int(port))
        self.delay_s = delay_ms / 1000
        self.listen_host = listen_host
        self.address: ProxyAddress | None = None
        self.traffic = ProxyTraffic()  # updated on the proxy's thread only
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"delay-proxy-{port}", daemon=True)

    def start(self) -> DelayProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("delay proxy did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, self.listen_host, 0))
        port = server.sockets[0].getsockname()[1]
        self.address = ProxyAddress(self.listen_host, port)
        log.info("event=proxy_listening listen=%s target=%s delay_ms=%.1f", self.address,
                 self.target, self.delay_s * 1000)
        self._ready.set()
        self._loop.run_forever()
        server.close()
        # Close open connections cleanly before the loop goes away.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target.host, self.target.port)
        except OSError:
            client_writer.close()
            return
        traffic = self.traffic
        traffic.connections += 1

        def to_target(n: int) -> None:
            traffic.bytes_to_target += n

        def from_target(n: int) -> None:
            traffic.bytes_from_target += n

        await asyncio.gather(_pump(client_reader, upstream_writer, self.delay_s, to_target),
                             _pump(upstream_reader, client_writer, self.delay_s, from_target))

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
