"""gRPC options every stage channel and server shares, set so that both ends agree.

Clients ping every 10 s so that a dead peer is noticed on an idle stream; servers
accept pings that often (gRPC's default minimum is 5 minutes, and a client that pings
faster is sent GOAWAY `too_many_pings`).
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 64 << 20
KEEPALIVE_MS = 10_000

_SIZES = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
CLIENT_OPTIONS = [
    *_SIZES,
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = [
    *_SIZES,
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),  # 0: never GOAWAY a client for pinging
]
