"""Activation frames over TCP: length-prefixed protobuf messages, one connection per lane.

Framing (docs/protocol.md): a 4-byte little-endian length, then the serialized message.
A connection opens with an ActivationHello each way (the client's carries the auth
token); then every ActivationFrame request gets one ActivationFrame answer, in order. Each
of stage 0's lanes has one connection, carrying batch frames of many sessions; it may send
a frame before the previous one is answered (session ends ahead of a batch).

The calling thread reads and writes the socket itself, so a frame crosses no thread on
its way (Python's gRPC hands every message between threads: ~0.4 ms more per hop here).
Every wait has a deadline: a frame's answer its FrameBudget, the next frame the idle limit,
the hello one deadline for the whole message (not per read).

Nothing a peer announces is allocated before it arrives, and nothing unauthenticated holds
much: a hello is at most MAX_HELLO_BYTES; connections still in their hello are capped in
all and per source address (past a cap the oldest such connection is closed, so idle ones
cannot lock out a client whose hello is quick), and take no connection slot (slots count
authenticated connections only); the frames every connection has read and not yet
answered share one byte budget per stage (`ConnectionLimits.unanswered_bytes`).
"""

from __future__ import annotations

import hmac
import logging
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError, Message

from layerline.errors import LayerlineError, StageUnavailableError
from layerline.proto import activation_pb2 as pb

from .frame_budget import FrameBudget
from .wire import frame_positions

log = logging.getLogger("layerline.stage")

MAX_MESSAGE_BYTES = 64 << 20
MAX_HELLO_BYTES = 4 << 10  # a hello holds a token and an error line
HELLO_TIMEOUT_S = 10.0  # for the whole hello
_READ_CHUNK = 1 << 20  # a message's buffer grows as its bytes arrive, from this
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

    max_connections: int = 64  # authenticated connections
    idle_s: float = 120.0  # between frames; a lane with sessions sends frames seconds apart at most
    max_greeting: int = 64  # connections still in their hello, from everywhere
    max_greeting_per_address: int = 8  # ... and from one address
    unanswered_bytes: int = 512 << 20  # frames read and not yet answered, over every connection


def write_message(sock: socket.socket, message: Message) -> None:
    data = message.SerializeToString()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def read_message(sock: socket.socket, kind: type[Message], *, limit: int = MAX_MESSAGE_BYTES,
                 deadline: float | None = None, reserve: Callable[[int], None] | None = None
                 ) -> Message | None:
    """The next framed message, or None at a clean end of the connection; at most `limit`
    bytes, read by `deadline` (time.monotonic()) when one is given; `reserve(length)` is told
    the length before any of the message is read (it may wait, or refuse by raising)."""
    header = _read_exactly(sock, _LENGTH.size, eof_ok=True, deadline=deadline)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > limit:
        raise ProtocolError(f"a {kind.__name__} of {length} bytes is over the limit of {limit}")
    if reserve is not None:
        reserve(length)
    data = _read_exactly(sock, length, eof_ok=False, deadline=deadline)
    try:
        return kind.FromString(data)
    except DecodeError as exc:
        raise ProtocolError(f"not a {kind.__name__}: {exc}") from exc


def _read_exactly(sock: socket.socket, n: int, *, eof_ok: bool,
                  deadline: float | None = None) -> bytes | None:
    # The buffer grows as bytes arrive: a length announced and never sent costs nothing.
    buffer = bytearray(min(n, _READ_CHUNK))
    got = 0
    while got < n:
        if got == len(buffer):
            buffer.extend(bytes(min(len(buffer), n - len(buffer))))
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the message did not arrive in time")
            sock.settimeout(left)
        received = sock.recv_into(memoryview(buffer)[got:])
        if received == 0:
            if got == 0 and eof_ok:
                return None
            raise ProtocolError(f"the connection ended inside a message ({got} of {n} bytes)")
        got += received
    return bytes(buffer)


class ByteBudget:
    """Bytes that many threads may hold at once; `take` waits for room, up to a timeout."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._room = threading.Condition()

    def take(self, n: int, timeout_s: float) -> None:
        """Hold n more bytes once they fit (TimeoutError after `timeout_s`)."""
        n = min(n, self.limit)  # one message over the whole budget still passes, alone
        with self._room:
            if not self._room.wait_for(lambda: self._held + n <= self.limit, timeout_s):
                raise TimeoutError(f"no room for a frame of {n} bytes in {timeout_s:.0f} s")
            self._held += n

    def give(self, n: int) -> None:
        """Hold n bytes fewer."""
        with self._room:
            self._held -= min(n, self.limit)
            self._room.notify_all()

    @contextmanager
    def reserving(self, timeout_s: float) -> Iterator[Callable[[int], None]]:
        """A `take` for the body of the block; what it took is given back at its end."""
        taken: list[int] = []

        def take(n: int) -> None:
            self.take(n, timeout_s)
            taken.append(n)

        try:
            yield take
        finally:
            for n in taken:
                self.give(n)


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
        self._connections: set[socket.socket] = set()  # authenticated
        # Connections in their hello, oldest first, and the address each came from.
        self._greeting: OrderedDict[socket.socket, str] = OrderedDict()
        self._unanswered = ByteBudget(limits.unanswered_bytes)
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
                connection, address = self._sock.accept()
            except OSError:
                return  # stopped
            with self._lock:
                self._greeting[connection] = address[0]
                self._evict_greeting(address[0])
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(connection,), name="frames", daemon=True).start()

    def _evict_greeting(self, source: str) -> None:
        """Past a cap on connections in their hello, close the oldest (under the lock)."""
        from_source = [c for c, s in self._greeting.items() if s == source]
        evicted = []
        if len(from_source) > self.limits.max_greeting_per_address:
            evicted.append(from_source[0])
        elif len(self._greeting) > self.limits.max_greeting:
            evicted.append(next(iter(self._greeting)))
        for connection in evicted:
            self._greeting.pop(connection)
            log.info("event=activation_hello_evicted source=%s greeting=%d", source, len(self._greeting))
            try:
                connection.shutdown(socket.SHUT_RDWR)  # its thread reads the end and leaves
            except OSError:
                pass

    def _serve(self, connection: socket.socket) -> None:
        try:
            if self._greet(connection):
                self._frames(connection)
        except (OSError, ProtocolError) as exc:
            log.debug("event=activation_connection_closed reason=%s", exc)
        finally:
            with self._lock:
                self._greeting.pop(connection, None)
                self._connections.discard(connection)
            connection.close()

    def _greet(self, connection: socket.socket) -> bool:
        """Read the hello (small, whole within HELLO_TIMEOUT_S), check the token, then take a
        connection slot: True when the connection is accepted."""
        hello = read_message(connection, pb.ActivationHello, limit=MAX_HELLO_BYTES,
                             deadline=time.monotonic() + HELLO_TIMEOUT_S)
        if hello is None:
            return False
        refusal = None
        if self._token is not None and not hmac.compare_digest(hello.auth_token.encode(),
                                                               self._token.encode()):
            refusal = (pb.ACTIVATION_ERROR_CODE_UNAUTHENTICATED,
                       "missing or wrong auth token: this stage was started with --auth-token-file")
        else:
            with self._lock:
                evicted = self._greeting.pop(connection, None) is None  # closed by a newer hello meanwhile
                full = len(self._connections) >= self.limits.max_connections
                if not (full or evicted):
                    self._connections.add(connection)
            if evicted:
                return False
            if full:
                refusal = (pb.ACTIVATION_ERROR_CODE_TOO_MANY_CONNECTIONS,
                           f"this stage serves at most {self.limits.max_connections} activation "
                           "connections at once; retry when one ends")
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
                # A frame's bytes count against the stage's budget until its answer is written.
                with self._unanswered.reserving(self.limits.idle_s) as reserve:
                    try:
                        frame = read_message(connection, pb.ActivationFrame, reserve=reserve)
                        if frame is None:
                            return
                        write_message(connection, handler.answer(frame))
                    except TimeoutError:
                        log.info("event=activation_connection_idle seconds=%.0f", self.limits.idle_s)
                        return
        finally:
            handler.close()
