"""Reading framed messages within limits: a whole-message deadline, a length cap checked before
any of the message is read, a buffer that grows only as bytes arrive, a shared byte budget."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from layerline.proto import activation_pb2 as pb
from layerline.runtime.stage.frame_transport import ByteBudget, ProtocolError, read_message, write_message


def test_a_message_dripped_a_byte_at_a_time_misses_its_whole_deadline():
    ours, theirs = socket.socketpair()
    data = pb.ActivationHello(auth_token="x" * 40).SerializeToString()
    message = len(data).to_bytes(4, "little") + data
    stop = threading.Event()

    def drip() -> None:
        for byte in message:
            if stop.wait(0.1):
                return
            theirs.send(bytes([byte]))

    threading.Thread(target=drip, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        read_message(ours, pb.ActivationHello, deadline=time.monotonic() + 1.0)
    assert time.monotonic() - started < 2.0  # not per read: each byte came well within a second
    stop.set()
    ours.close()
    theirs.close()


def test_a_length_over_the_limit_is_refused_before_its_bytes_are_read():
    ours, theirs = socket.socketpair()
    theirs.sendall((64 << 20).to_bytes(4, "little"))
    with pytest.raises(ProtocolError, match="over the limit of 4096"):
        read_message(ours, pb.ActivationHello, limit=4096)
    write_message(theirs, pb.ActivationHello(error="fine"))
    ours.close()
    theirs.close()


def test_the_byte_budget_waits_for_room_and_gives_it_back():
    budget = ByteBudget(10)
    with budget.reserving(1.0) as take:
        take(8)
        with pytest.raises(TimeoutError):
            budget.take(5, 0.1)
    budget.take(10, 0.1)  # all of it given back at the end of the block
    budget.give(10)
    budget.take(50, 0.1)  # one message over the whole budget passes alone
