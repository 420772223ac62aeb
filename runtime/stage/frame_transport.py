"""Activation frames over TCP: length-prefixed protobuf messages, one connection per lane.

Framing (docs/protocol.md): a 4-byte little-endian length, then the serialized message.
A connection opens with an ActivationHello each way (the client's carries the auth
token); then every ActivationFrame request gets one ActivationFrame answer, in order. Each
of stage 0's lanes has one connection, carrying batch frames of many sessions; it may send
a frame before the previous one is answered (session ends ahead of a batch).

The calling thread reads and writes the socket itself, so a frame crosses no thread on
its way (Python's gRPC hands every message between threads: ~0.4 ms more per hop here).
Every wait has a deadline: a frame's answer its FrameBudget, the next frame the idle limit.
"""

from __future__ import annotations

import hmac
import logging
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError, Message

from layerline.errors import LayerlineError, StageUnavailableError
from layerline.proto import activation_pb2 as pb

from .frame_budget import FrameBudget
from .wire import frame_positions

log = logging.getLogger("layerline.stage")

MAX_MESSAGE_BYTES = 64 << 20
HELLO_TIMEOUT_S = 10.0
_LENGTH = struct.Struct("<I")


class FrameTimeoutError(StageUnavailableError):
    """A downstream stage did not answer a frame within its budget."""


class ConnectionRefusedByStage(StageUnavailableError):
    """A stage refused an activation connection (bad token, too many connections)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ProtocolError(LayerlineError):
    """A peer sent bytes that are not a framed message of the expected kind."""


@dataclass(frozen=True)
class ConnectionLimits:
    """How many activation connections a stage serves at once, and how long one may sit idle."""

    max_connections: int = 64
    idle_s: float = 120.0  # between frames; a lane with sessions sends frames seconds apart at most


def write_message(sock: socket.socket, message: Message) -> None:
    data = message.SerializeToString()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def read_message(sock: socket.socket, kind: type[Message]) -> Message | None:
    """The next framed message, or None at a clean end of the connection."""
    header = _read_exactly(sock, _LENGTH.size, eof_ok=True)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a message of {length} bytes is over the limit of {MAX_MESSAGE_BYTES}")
    data = _read_exactly(sock, length, eof_ok=False)
    try:
        return kind.FromString(data)
    except DecodeError as exc:
        raise ProtocolError(f"not a {kind.__name__}: {exc}") from exc


def _read_exactly(sock: socket.socket, n: int, *, eof_ok: bool) -> bytes | None:
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        received = sock.recv_into(view[got:])
        if received == 0:
            if got == 0 and eof_ok:
                return None
            raise ProtocolError(f"the connection ended inside a message ({got} of {n} bytes)")
        got += received
    return bytes(buffer)


def _connect(endpoint: str, timeout_s: float) -> socket.socket:
    host, _, port = endpoint.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class FrameConnection:
    """A client's connection to one stage's activation endpoint: send a frame, read its answer."""

    def __init__(self, endpoint: str, *, budget: FrameBudget, token: str | None = None) -> None:
        self.endpoint = endpoint
        self._budget = budget
        self._in_flight: deque[tuple[int, float]] = deque()  # (positions, sent at) per frame unanswered
        try:
            self._sock = _connect(endpoint, HELLO_TIMEOUT_S)
            write_message(self._sock, pb.ActivationHello(auth_token=token or ""))
            hello = read_message(self._sock, pb.ActivationHello)
        except (OSError, ProtocolError) as exc:
            raise StageUnavailableError(f"cannot open an activation connection to {endpoint}: {exc}",
                                        hint="check that the stage runs and the address is right") from exc
        if hello is None or hello.error:
            self._sock.close()
            reason = hello.error if hello is not None else "it closed the connection"
            raise ConnectionRefusedByStage(f"stage {endpoint} refused the activation connection: {reason}",
                                           hello.code if hello is not None else 0)

    def call(self, frame: pb.ActivationFrame) -> pb.ActivationFrame:
        """Send one frame and return the stage's answer, within the frame's budget."""
        self.send(frame)
        return self.receive()

    def send(self, frame: pb.ActivationFrame) -> None:
        """Send one frame; its answer is read by a later `receive()` (answers come in order)."""
        positions = frame_positions(frame)
        budget = self._budget.seconds(positions)
        try:
            self._sock.settimeout(budget)
            write_message(self._sock, frame)
        except TimeoutError as exc:
            self.close()
            raise FrameTimeoutError(f"{self.endpoint} took no frame of {positions} positions within "
                                    f"{budget:.1f} s",
                                    hint="check that stage; stage 0 marks it down") from exc
        except OSError as exc:
            self.close()
            raise StageUnavailableError(f"the activation connection to {self.endpoint} broke: {exc}") from exc
        self._in_flight.append((positions, time.monotonic()))

    def receive(self) -> pb.ActivationFrame:
        """The answer to the oldest frame sent and not answered, within that frame's budget."""
        positions, started = self._in_flight.popleft()
        budget = self._budget.seconds(positions)
        try:
            self._sock.settimeout(max(0.001, started + budget - time.monotonic()))
            answer = read_message(self._sock, pb.ActivationFrame)
        except TimeoutError as exc:
            self.close()
            raise FrameTimeoutError(f"{self.endpoint} did not answer a frame of {positions} positions "
                                    f"within {budget:.1f} s",
                                    hint="check that stage; stage 0 marks it down") from exc
        except (OSError, ProtocolError) as exc:
            self.close()
            raise StageUnavailableError(f"the activation connection to {self.endpoint} broke: {exc}") from exc
        if answer is None:
            self.close()
            raise StageUnavailableError(f"{self.endpoint} closed the activation connection")
        self._budget.record(positions, time.monotonic() - started)
        return answer

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


class ConnectionHandler(Protocol):
    """What serves one connection's frames (the stage's relay)."""

    def answer(self, frame: pb.ActivationFrame) -> pb.ActivationFrame: ...
    def close(self) -> None: ...


class FrameServer:
    """A stage's activation endpoint: one thread per connection, each serving its frames in order.

    `open_handler()` makes the per-connection handler (a relay) and `close()` on it runs when
    the connection ends, which drops the sessions it carried.
    """

    def __init__(self, listen: str, open_handler: Callable[[], ConnectionHandler], *,
                 token: str | None = None, limits: ConnectionLimits = ConnectionLimits()) -> None:
        host, _, port = listen.rpartition(":")
        self._sock = socket.create_server((host.strip("[]"), int(port)), reuse_port=False)
        self.port = self._sock.getsockname()[1]
        self._open_handler = open_handler
        self._token = token
        self.limits = limits
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="frame-accept", daemon=True)

    def start(self) -> FrameServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, and end every open connection (their sessions are dropped)."""
        self._stopped.set()
        self._sock.close()
        with self._lock:
            for connection in list(self._connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self._sock.accept()
            except OSError:
                return  # stopped
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(connection,), name="frames", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with self._lock:
            full = len(self._connections) >= self.limits.max_connections
            if not full:
                self._connections.add(connection)
        try:
            if self._greet(connection, full):
                self._frames(connection)
        except (OSError, ProtocolError) as exc:
            log.debug("event=activation_connection_closed reason=%s", exc)
        finally:
            with self._lock:
                self._connections.discard(connection)
            connection.close()

    def _greet(self, connection: socket.socket, full: bool) -> bool:
        connection.settimeout(HELLO_TIMEOUT_S)
        hello = read_message(connection, pb.ActivationHello)
        if hello is None:
            return False
        refusal = None
        if self._token is not None and not hmac.compare_digest(hello.auth_token.encode(),
                                                               self._token.encode()):
            refusal = (pb.ACTIVATION_ERROR_CODE_UNAUTHENTICATED,
                       "missing or wrong auth token: this stage was started with --auth-token-file")
        elif full:
            refusal = (pb.ACTIVATION_ERROR_CODE_TOO_MANY_CONNECTIONS,
                       f"this stage serves at most {self.limits.max_connections} activation connections "
                       "at once; retry when one ends")
        if refusal is not None:
            write_message(connection, pb.ActivationHello(code=refusal[0], error=refusal[1]))
            return False
        write_message(connection, pb.ActivationHello())
        return True

    def _frames(self, connection: socket.socket) -> None:
        handler = self._open_handler()
        try:
            while True:
                connection.settimeout(self.limits.idle_s)
                try:
                    frame = read_message(connection, pb.ActivationFrame)
                except TimeoutError:
                    log.info("event=activation_connection_idle seconds=%.0f", self.limits.idle_s)
                    return
                if frame is None:
                    return
                write_message(connection, handler.answer(frame))
        finally:
            handler.close()
