"""A coordinator's control connection to one stage: typed calls with deadlines and auth."""

from __future__ import annotations

from typing import Any

import grpc

from layerline.errors import StageUnavailableError
from layerline.proto import stage_control_pb2 as pb
from layerline.proto import stage_control_pb2_grpc as pb_grpc

from .grpc_options import CLIENT_OPTIONS
from .server import auth_metadata


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
