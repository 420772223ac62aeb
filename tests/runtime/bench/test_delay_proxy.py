"""The delaying TCP proxy the benchmark puts between stages (this kernel has no netem)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

from layerline.runtime.bench.delay_proxy import DelayProxy


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def test_bytes_arrive_intact_after_the_delay_each_way():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = DelayProxy(f"127.0.0.1:{server.server_address[1]}", delay_ms=50).start()
    try:
        with socket.create_connection((proxy.address.host, proxy.address.port), timeout=10) as conn:
            payload = bytes(range(256)) * 4096  # 1 MiB
            started = time.monotonic()
            conn.sendall(payload)
            received = b""
            while len(received) < len(payload):
                received += conn.recv(1 << 20)
            elapsed = time.monotonic() - started
        assert received == payload
        assert elapsed >= 0.1  # one delay out, one back
    finally:
        proxy.stop()
        server.shutdown()
