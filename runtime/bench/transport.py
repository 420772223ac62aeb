"""`layerline bench transport`: the floor of a hop, with no model in it.

A frame of hidden states (a batch of one session's one position: `hidden` floats) goes
through two hops and back, as in a 3-stage pipeline: this process -> relay process -> echo
process, each in its own process, lockstep, with a pause between frames as between decode
steps. Measured for
both transports this code knows: Python gRPC bidirectional streams (what activations
used before) and length-prefixed frames on TCP (what they use now).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from layerline.proto import activation_pb2 as pb

from ..stage.frame_budget import FrameBudget
from ..stage.frame_transport import FrameConnection, FrameServer
from ..stage.grpc_options import CLIENT_OPTIONS, SERVER_OPTIONS

_METHOD = "/layerline.bench.v1.Echo/Forward"


@dataclass(frozen=True)
class TransportRow:
    transport: str
    frame_bytes: int
    pause_ms: float
    median_us: float
    p90_us: float

    def to_json(self) -> dict[str, float | str | int]:
        return {"transport": self.transport, "frame_bytes": self.frame_bytes, "pause_ms": self.pause_ms,
                "median_us": round(self.median_us, 1), "p90_us": round(self.p90_us, 1)}


def _frame(hidden: int) -> pb.ActivationFrame:
    """One decode step of one session, as stage 0 sends it: a batch of one."""
    return pb.ActivationFrame(seq=1, batch=pb.BatchActivations(
        sessions=[pb.SessionRows(session_id="bench", start_pos=0, token_count=1)],
        activations=pb.Activations(token_count=1, dtype=pb.WIRE_DTYPE_F32, shape=[1, 1, hidden],
                                   data=bytes(4 * hidden))))


# ---------------------------------------------------------------- the hop processes


class _Relay:
    """One hop: answers a frame itself (the last hop) or with the next hop's answer."""

    def __init__(self, downstream: str | None) -> None:
        self.downstream = FrameConnection(downstream, budget=FrameBudget(30.0)) if downstream else None

    def answer(self, frame: pb.ActivationFrame) -> pb.ActivationFrame:
        return self.downstream.call(frame) if self.downstream is not None else frame

    def close(self) -> None:
        if self.downstream is not None:
            self.downstream.close()


def _serve_frames(downstream: str | None) -> None:
    server = FrameServer("127.0.0.1:0", lambda: _Relay(downstream)).start()
    print(f"127.0.0.1:{server.port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    os._exit(0)


def _serve_grpc(downstream: str | None) -> None:
    from concurrent import futures

    stub = None
    if downstream:
        channel = grpc.insecure_channel(downstream, options=CLIENT_OPTIONS)
        stub = channel.stream_stream(_METHOD, request_serializer=pb.ActivationFrame.SerializeToString,
                                     response_deserializer=pb.ActivationFrame.FromString)

    def forward(requests, context):  # noqa: ANN001 - gRPC's handler signature
        if stub is None:
            yield from requests
        else:
            yield from stub(requests)

    handler = grpc.method_handlers_generic_handler("layerline.bench.v1.Echo", {
        "Forward": grpc.stream_stream_rpc_method_handler(
            forward, request_deserializer=pb.ActivationFrame.FromString,
            response_serializer=pb.ActivationFrame.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"127.0.0.1:{port}", flush=True)
    sys.stdin.read()
    os._exit(0)  # gRPC's threads would hold the interpreter open


def serve_hop(kind: str, downstream: str | None) -> None:
    """Entry point of a hop process (`python -m layerline.runtime.bench.transport KIND [NEXT]`)."""
    (_serve_frames if kind == "frames" else _serve_grpc)(downstream)


# ---------------------------------------------------------------- the measurement


def _start_chain(kind: str) -> tuple[list[subprocess.Popen], str]:
    processes: list[subprocess.Popen] = []
    downstream: str | None = None
    for _ in range(2):  # the echo first, then the relay in front of it
        argv = [sys.executable, "-m", "layerline.runtime.bench.transport", kind,
                *([downstream] if downstream else [])]
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        processes.append(process)
        downstream = process.stdout.readline().strip()
    assert downstream is not None
    return processes, downstream


def _round_trips(call: Callable[[pb.ActivationFrame], object], frame: pb.ActivationFrame, frames: int,
                 pause_s: float) -> list[float]:
    for _ in range(50):  # warm up
        call(frame)
    seconds = []
    for _ in range(frames):
        if pause_s:
            time.sleep(pause_s)
        started = time.perf_counter()
        call(frame)
        seconds.append(time.perf_counter() - started)
    return seconds


def _grpc_caller(entry: str) -> Callable[[pb.ActivationFrame], object]:
    """Send a frame on one lockstep gRPC stream and wait for its answer, as activations once did."""
    import queue

    channel = grpc.insecure_channel(entry, options=CLIENT_OPTIONS)
    requests: queue.Queue = queue.Queue()
    stream = channel.stream_stream(_METHOD, request_serializer=pb.ActivationFrame.SerializeToString,
                                   response_deserializer=pb.ActivationFrame.FromString)
    responses = stream(iter(requests.get, None))

    def call(frame: pb.ActivationFrame) -> object:
        requests.put(frame)
        return next(responses)

    return call


def bench_transport(hidden: int = 512, frames: int = 500, pause_ms: float = 5.0) -> list[TransportRow]:
    """Median and 90th percentile round trip through two hops, per transport."""
    frame = _frame(hidden)
    rows = []
    for kind in ("grpc", "frames"):
        processes, entry = _start_chain(kind)
        try:
            call = FrameConnection(entry, budget=FrameBudget(30.0)).call if kind == "frames" else \
                _grpc_caller(entry)
            for pause in (0.0, pause_ms / 1000):
                seconds = sorted(_round_trips(call, frame, frames, pause))
                rows.append(TransportRow(kind, frame.ByteSize(), pause * 1000,
                                         statistics.median(seconds) * 1e6,
                                         seconds[int(0.9 * len(seconds))] * 1e6))
        finally:
            for process in processes:
                process.stdin.close()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
    return rows


def render_transport(rows: list[TransportRow]) -> str:
    lines = ["| transport | frame bytes | pause between frames | median µs (2 hops, round trip) | p90 µs |",
             "|---|---|---|---|---|"]
    for r in rows:
        name = "gRPC stream" if r.transport == "grpc" else "TCP frames"
        lines.append(f"| {name} | {r.frame_bytes} | {r.pause_ms:g} ms | {r.median_us:.0f} | {r.p90_us:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    serve_hop(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
