"""A coordinator's control connection to one stage: typed calls with deadlines and auth."""

from __future__ import annotations

from typing import Any

import grpc

from layerline.errors import StageUnavailableError
from layerline.proto import stage_control_pb2 as pb
from layerline.proto import stage_control_pb2_grpc as pb_grpc

from .grpc_options import CLIENT_OPTIONS

AUTH_HEADER = "authorization"


def auth_metadata(token: str | None) -> list[tuple[str, str]] | None:
    """The call metadata that carries `token`, for clients of an authenticated stage."""
    return [(AUTH_HEADER, f"Bearer {token}")] if token else None


class StageRejectedError(StageUnavailableError):
    """A stage answered with Rejected."""

    def __init__(self, endpoint: str, rejected: pb.Rejected) -> None:
        reason = pb.RejectReason.Name(rejected.reason)
        super().__init__(f"stage {endpoint} rejected the request ({reason}): {rejected.message}")
        self.rejected = rejected


class StageClient:
    def __init__(self, endpoint: str, *, coordinator_id: str, term: int, run_id: str,
                 token: str | None = None, timeout_s: float = 10.0) -> None:
        self.endpoint = endpoint
        self.coordinator_id, self.term, self.run_id = coordinator_id, term, run_id
        self._metadata = auth_metadata(token)
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(endpoint, options=CLIENT_OPTIONS)
        self._stub = pb_grpc.StageControlStub(self._channel)

    def call(self, timeout_s: float | None = None, **request: Any) -> pb.StageControlResponse:
        """Send one control request (e.g. `claim=pb.Claim(...)`); raise on errors and rejections."""
        message = pb.StageControlRequest(coordinator_id=self.coordinator_id, term=self.term,
                                         run_id=self.run_id, **request)
        try:
            response = self._stub.Control(message, timeout=timeout_s or self._timeout_s,
                                          metadata=self._metadata)
        except grpc.RpcError as exc:
            raise StageUnavailableError(
                f"stage {self.endpoint} did not answer {next(iter(request))}: "
                f"{exc.code().name} {exc.details()}",
                hint="check that `layerline stage serve` runs there and the address and token are right",
            ) from exc
        if response.WhichOneof("response") == "rejected":
            raise StageRejectedError(self.endpoint, response.rejected)
        return response

    def status(self, timeout_s: float | None = None) -> pb.Status:
        return self.call(timeout_s, status=pb.StatusRequest()).status

    def close(self) -> None:
        self._channel.close()


class ActivationAddress:
    """Where a stage takes activation frames: asked of its control endpoint (Status), kept
    until a connection to it fails (a restarted stage listens on a new port)."""

    def __init__(self, control_endpoint: str, token: str | None = None) -> None:
        self.control_endpoint = control_endpoint
        self._token = token
        self._cached: str | None = None

    def get(self) -> str:
        if self._cached is None:
            client = StageClient(self.control_endpoint, coordinator_id="", term=0, run_id="",
                                 token=self._token, timeout_s=5.0)
            try:
                advertised = client.status().activation_endpoint
            finally:
                client.close()
            if not advertised:
                raise StageUnavailableError(f"stage {self.control_endpoint} names no activation endpoint")
            self._cached = resolve_advertised(advertised, self.control_endpoint)
        return self._cached

    def forget(self) -> None:
        self._cached = None


def resolve_advertised(advertised: str, reached_at: str) -> str:
    """`host:port` as advertised, or the host of `reached_at` (host:port) when only `:port` is."""
    if advertised.startswith(":"):
        return f"{reached_at.rpartition(':')[0]}{advertised}"
    return advertised
