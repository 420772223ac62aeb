"""A stage's servers: gRPC control (a thin servicer over StageNode, with an auth check) and the
activation endpoint, side by side."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from layerline.errors import LayerlineError
from layerline.proto import stage_control_pb2_grpc

from .activation import ActivationRelay
from .client import AUTH_HEADER
from .file_service import FileIndex, PackageFilesServicer, RateLimit
from .frame_transport import ConnectionLimits, FrameServer
from .grpc_options import SERVER_OPTIONS
from .node import LayerProber, ModelLoader, StageNode

log = logging.getLogger("layerline.stage")

CONTROL_WORKERS = 16  # control calls are short; activation frames have threads of their own


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
        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def caller_host(peer: str) -> str:
    """The host of a gRPC peer string ("ipv4:10.0.0.2:5123", "ipv6:[::1]:5123"); "" otherwise."""
    kind, _, address = peer.partition(":")
    return address.rpartition(":")[0] if kind in ("ipv4", "ipv6") else ""


class ControlServicer(stage_control_pb2_grpc.StageControlServicer):
    def __init__(self, node: StageNode) -> None:
        self.node = node

    def Control(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self.node.handle(request, caller_host(context.peer()))


@dataclass
class StageServer:
    """A running stage: its gRPC control server and its activation endpoint."""

    control: grpc.Server
    frames: FrameServer
    node: StageNode

    def stop(self, grace_s: float) -> None:
        """Refuse new calls, give those in flight `grace_s`, then end every activation connection."""
        self.control.stop(grace=grace_s).wait()
        self.frames.stop()


def advertised(listen_host: str, port: int) -> str:
    """The activation endpoint to tell others: this host, or only the port when listening on
    every address (the coordinator then puts the host it reaches this stage's control at)."""
    wildcard = listen_host.strip("[]") in ("", "0.0.0.0", "::")
    return f":{port}" if wildcard else f"{listen_host}:{port}"


def grpc_server(listen: str, auth_token: str | None) -> tuple[grpc.Server, str]:
    """A gRPC server bound to `listen` (port 0 picks one), not started; and the endpoint it has."""
    interceptors = [TokenAuthInterceptor(auth_token)] if auth_token else []
    workers = futures.ThreadPoolExecutor(max_workers=CONTROL_WORKERS, thread_name_prefix="stage-rpc")
    server = grpc.server(workers, interceptors=interceptors, options=SERVER_OPTIONS)
    host, _, port = listen.rpartition(":")
    bound = server.add_insecure_port(listen)
    if bound == 0:
        raise LayerlineError(f"cannot listen on {listen}", hint="choose a free port with --listen")
    return server, (f"{host}:{bound}" if port == "0" else listen)


def serve_files(server: grpc.Server, index: FileIndex, name: str, rate_limit_mb_s: float = 0.0) -> None:
    """Add PackageFiles (what `index` holds, at most `rate_limit_mb_s` MB/s in all) to `server`."""
    servicer = PackageFilesServicer(index, RateLimit(rate_limit_mb_s * 1e6), name)
    stage_control_pb2_grpc.add_PackageFilesServicer_to_server(servicer, server)


def start_stage_server(listen: str, cache_dir: Path, loader: ModelLoader, *, auth_token: str | None = None,
                       limits: ConnectionLimits = ConnectionLimits(), activation_listen: str | None = None,
                       activation_advertise: str | None = None, file_rate_limit_mb_s: float = 0.0,
                       prober: LayerProber | None = None) -> StageServer:
    """Start a stage on `listen` (host:port; port 0 picks one): gRPC control and package files
    there, activation frames on `activation_listen` (default: the same host, a free port); a
    claim's layer probe is timed by `prober` (None: answered with an error)."""
    server, endpoint = grpc_server(listen, auth_token)
    host = listen.rpartition(":")[0]
    node = StageNode(endpoint, cache_dir, loader, token=auth_token, prober=prober)
    try:
        frames = FrameServer(activation_listen or f"{host}:0", lambda: ActivationRelay(node),
                             token=auth_token, limits=limits)
    except OSError as exc:
        raise LayerlineError(f"cannot listen for activations on {activation_listen or host}: {exc}",
                             hint="choose a free address with --activation-listen") from exc
    activation_host = (activation_listen or host).rpartition(":")[0] if activation_listen else host
    node.activation_endpoint = activation_advertise or advertised(activation_host, frames.port)
    stage_control_pb2_grpc.add_StageControlServicer_to_server(ControlServicer(node), server)
    serve_files(server, node.files, endpoint, file_rate_limit_mb_s)
    server.start()
    frames.start()
    log.info("stage=%s event=listening activations=%s auth=%s", endpoint, node.activation_endpoint,
             "token" if auth_token else "none")
    return StageServer(server, frames, node)
