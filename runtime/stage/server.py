"""The gRPC face of a stage: thin servicers over StageNode, an auth check, the server."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from layerline.errors import LayerlineError
from layerline.proto import activation_pb2_grpc, stage_control_pb2_grpc

from .activation import ActivationRelay
from .deadlines import Deadlines
from .grpc_options import SERVER_OPTIONS, StreamLimits
from .node import ModelLoader, StageNode

log = logging.getLogger("layerline.stage")

AUTH_HEADER = "authorization"
CONTROL_WORKERS = 8  # threads kept for control calls whatever the activation streams do


def auth_metadata(token: str | None) -> list[tuple[str, str]] | None:
    """The call metadata that carries `token`, for clients of an authenticated stage."""
    return [(AUTH_HEADER, f"Bearer {token}")] if token else None


def read_token(path: Path | str | None, option: str = "--auth-token-file") -> str | None:
    """The secret in `path` (whitespace stripped), or None without a path; `option` names the flag."""
    if path is None:
        return None
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise LayerlineError(f"cannot read the token file {path} given to {option}: {exc}",
                             hint=f"pass an existing file with {option}") from exc
    if not token:
        raise LayerlineError(f"the token file {path} given to {option} is empty",
                             hint="write a secret into it, e.g. `openssl rand -hex 32 > FILE`")
    return token


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address, brackets allowed) reaches this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose `authorization: Bearer <token>` is missing or wrong."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        given = dict(details.invocation_metadata or ()).get(AUTH_HEADER, "")
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(details)
        handler = continuation(details)
        message = "missing or wrong auth token: this stage was started with --auth-token-file"

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler is not None and handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


class ControlServicer(stage_control_pb2_grpc.StageControlServicer):
    def __init__(self, node: StageNode) -> None:
        self.node = node

    def Control(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self.node.handle(request)


class ActivationServicer(activation_pb2_grpc.StageActivationServicer):
    """Serves at most `limits.max_streams` Forward streams; a stream idle too long is cancelled."""

    def __init__(self, node: StageNode, downstream_token: str | None, limits: StreamLimits,
                 deadlines: Deadlines) -> None:
        self.node = node
        self.metadata = auth_metadata(downstream_token)
        self.limits = limits
        self.deadlines = deadlines
        self._open = 0
        self._lock = threading.Lock()

    def Forward(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        with self._lock:
            full = self._open >= self.limits.max_streams
            if not full:
                self._open += 1
        if full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"stage {self.node.endpoint} serves at most {self.limits.max_streams} activation "
                          "streams at once; retry when one ends")
        try:
            frames = self._until_idle(request_iterator, context)
            yield from ActivationRelay(self.node, self.deadlines, self.metadata).serve(frames)
        finally:
            with self._lock:
                self._open -= 1

    def _until_idle(self, frames: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """The stream's frames; waiting longer than `idle_s` for the next cancels the stream."""
        while True:
            handle = self.deadlines.arm(self.limits.idle_s, context.cancel)
            try:
                frame = next(frames, None)
            finally:
                self.deadlines.clear(handle)
            if frame is None:
                return
            yield frame


def start_stage_server(listen: str, cache_dir: Path, loader: ModelLoader, *, auth_token: str | None = None,
                       limits: StreamLimits = StreamLimits()) -> tuple[grpc.Server, StageNode]:
    """Start a stage's gRPC server on `listen` (host:port; port 0 picks one)."""
    interceptors = [TokenAuthInterceptor(auth_token)] if auth_token else []
    # Streams beyond max_streams are refused at once, so CONTROL_WORKERS threads stay free.
    workers = futures.ThreadPoolExecutor(max_workers=limits.max_streams + CONTROL_WORKERS,
                                         thread_name_prefix="stage-rpc")
    server = grpc.server(workers, interceptors=interceptors, options=SERVER_OPTIONS,
                         maximum_concurrent_rpcs=limits.max_streams + CONTROL_WORKERS)
    host, _, port = listen.rpartition(":")
    bound = server.add_insecure_port(listen)
    if bound == 0:
        raise LayerlineError(f"cannot listen on {listen}", hint="choose a free port with --listen")
    endpoint = f"{host}:{bound}" if port == "0" else listen
    node = StageNode(endpoint, cache_dir, loader)
    stage_control_pb2_grpc.add_StageControlServicer_to_server(ControlServicer(node), server)
    activation_pb2_grpc.add_StageActivationServicer_to_server(
        ActivationServicer(node, auth_token, limits, Deadlines()), server)
    server.start()
    log.info("stage=%s event=listening auth=%s", endpoint, "token" if auth_token else "none")
    return server, node
