"""The layerline.stage.v1 schema: generated modules fresh, house rules kept, gRPC round trips."""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message

from layerline.proto import (
    activation_pb2,
    stage_control_pb2,
    stage_control_pb2_grpc,
)
from layerline.runtime.stage.frame_budget import FrameBudget
from layerline.runtime.stage.frame_transport import FrameConnection, FrameServer

REPO = Path(__file__).resolve().parents[3]
MAX_MESSAGE_BYTES = 64 << 20
CALL_TIMEOUT_S = 10.0
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


def load_gen_proto():
    """scripts/gen_proto.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_proto = load_gen_proto()


# ---------------------------------------------------------------- generated code


def test_generated_modules_match_what_protoc_makes_from_the_proto_files():
    assert gen_proto.stale_files() == []


def test_check_mode_fails_on_a_stale_module(tmp_path):
    for proto in gen_proto.proto_files():
        (tmp_path / proto.name).write_bytes(proto.read_bytes())
    gen_proto.write(tmp_path)
    assert gen_proto.main(["--check", "--proto-dir", str(tmp_path)]) == 0
    stale = tmp_path / "activation_pb2.py"
    stale.write_bytes(stale.read_bytes() + b"# hand edit\n")
    (tmp_path / "orphan_pb2.py").write_text("")
    assert gen_proto.main(["--check", "--proto-dir", str(tmp_path)]) == 1
    assert gen_proto.stale_files(tmp_path) == [
        "activation_pb2.py differs from what protoc makes now",
        "orphan_pb2.py has no .proto left to generate it",
    ]


def test_generated_classes_name_their_real_module_so_messages_pickle():
    request = stage_control_pb2.StageControlRequest(coordinator_id="coord-a", term=2)
    assert type(request).__module__ == "layerline.proto.stage_control_pb2"
    assert pickle.loads(pickle.dumps(request)) == request


# ---------------------------------------------------------------- house rules

FILES = (activation_pb2.DESCRIPTOR, stage_control_pb2.DESCRIPTOR)


def all_enums():
    for file in FILES:
        yield from file.enum_types_by_name.values()
        for message in file.message_types_by_name.values():
            yield from message.enum_types


def constant_case(name: str) -> str:
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()


@pytest.mark.parametrize("enum", list(all_enums()), ids=lambda e: e.name)
def test_enum_starts_with_unspecified_zero_and_prefixes_every_value(enum):
    prefix = constant_case(enum.name)
    assert enum.values_by_number[0].name == f"{prefix}_UNSPECIFIED"
    assert all(v.name.startswith(f"{prefix}_") for v in enum.values)


def test_enums_cover_the_design():
    assert set(activation_pb2.WireDtype.keys()) == {
        "WIRE_DTYPE_UNSPECIFIED",
        "WIRE_DTYPE_F32",
        "WIRE_DTYPE_F16",
        "WIRE_DTYPE_BF16",
    }
    assert {
        "REJECT_REASON_CLAIMED_BY_OTHER",
        "REJECT_REASON_STALE_TERM",
        "REJECT_REASON_NOT_CLAIMED",
        "REJECT_REASON_BAD_REQUEST",
        "REJECT_REASON_UNAUTHENTICATED",
        "REJECT_REASON_LOAD_FAILED",
    } <= set(stage_control_pb2.RejectReason.keys())
    assert set(stage_control_pb2.InventoryState.keys()) == {
        "INVENTORY_STATE_UNSPECIFIED",
        "INVENTORY_STATE_PREPARING",
        "INVENTORY_STATE_READY",
        "INVENTORY_STATE_FAILED",
    }


def test_load_request_carries_no_draft_fields():
    names = stage_control_pb2.StageLoadRequest.DESCRIPTOR.fields_by_name
    assert not [name for name in names if "draft" in name or "specul" in name]


# descriptor.proto field numbers: the path of each element in SourceCodeInfo.
MESSAGE, ENUM, SERVICE = 4, 5, 6
M_FIELD, M_NESTED, M_ENUM, M_ONEOF = 2, 3, 4, 8
E_VALUE, S_METHOD = 2, 2


def element_paths(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[tuple, str]]:
    """(source-info path, full name) of every message, field, oneof, enum, value, rpc."""

    def enum(path: tuple, e: descriptor_pb2.EnumDescriptorProto, scope: str):
        yield path, f"{scope}.{e.name}"
        for i, value in enumerate(e.value):
            yield (*path, E_VALUE, i), f"{scope}.{e.name}.{value.name}"

    def message(path: tuple, m: descriptor_pb2.DescriptorProto, scope: str):
        name = f"{scope}.{m.name}"
        yield path, name
        for i, field in enumerate(m.field):
            yield (*path, M_FIELD, i), f"{name}.{field.name}"
        for i, oneof in enumerate(m.oneof_decl):
            yield (*path, M_ONEOF, i), f"{name}.{oneof.name}"
        for i, nested in enumerate(m.nested_type):
            yield from message((*path, M_NESTED, i), nested, name)
        for i, e in enumerate(m.enum_type):
            yield from enum((*path, M_ENUM, i), e, name)

    for i, m in enumerate(file.message_type):
        yield from message((MESSAGE, i), m, file.package)
    for i, e in enumerate(file.enum_type):
        yield from enum((ENUM, i), e, file.package)
    for i, service in enumerate(file.service):
        yield (SERVICE, i), f"{file.package}.{service.name}"
        for j, method in enumerate(service.method):
            yield (SERVICE, i, S_METHOD, j), f"{file.package}.{service.name}.{method.name}"


def test_every_element_of_the_proto_files_has_a_comment():
    undocumented = []
    for file in gen_proto.descriptor_set().file:
        commented = {
            tuple(loc.path)
            for loc in file.source_code_info.location
            if loc.leading_comments.strip() or loc.trailing_comments.strip()
        }
        undocumented += [name for path, name in element_paths(file) if path not in commented]
    assert undocumented == []


def test_proto_files_use_the_versioned_package():
    assert [f.package for f in FILES] == ["layerline.stage.v1"] * 2
    assert stage_control_pb2.StageControlRequest.DESCRIPTOR.full_name == (
        "layerline.stage.v1.StageControlRequest"
    )


# ---------------------------------------------------------------- round trips

pb = stage_control_pb2
PACKAGE = pb.PackageIdentity(ref="org/model-layers@main", manifest_sha256="ab" * 32)
LAYERS = pb.LayerRange(start=10, end=20)

REQUESTS: dict[str, Message] = {
    "claim": pb.Claim(package=PACKAGE, lease_duration_ms=30_000),
    "prepare": pb.Prepare(layers=LAYERS, include_stage0_files=True),
    "inventory": pb.InventoryRequest(),
    "load": pb.StageLoadRequest(
        layers=LAYERS,
        stage_index=1,
        stage_count=3,
        upstream_peer="10.0.0.1:7701",
        downstream_peer="10.0.0.3:7701",
        package=PACKAGE,
        wire_dtype=activation_pb2.WIRE_DTYPE_BF16,
        kv_cache=pb.KvCacheConfig(context_length=4096, max_sessions=4),
        batch=pb.BatchConfig(max_batch_tokens=512),
        weight_format="auto",
    ),
    "release": pb.Release(),
    "status": pb.StatusRequest(),
}

RESPONSES: dict[str, Message] = {
    "claim_accepted": pb.ClaimAccepted(
        lease_duration_ms=30_000,
        lease_expires_unix_ms=1_700_000_030_000,
        preempted_coordinator_id="coord-old",
    ),
    "prepare_accepted": pb.PrepareAccepted(
        bytes_total=123_456_789, files=["layers/00010.safetensors", "layers/00011.safetensors"]
    ),
    "inventory": pb.Inventory(
        state=pb.INVENTORY_STATE_PREPARING,
        bytes_present=1 << 33,
        bytes_total=1 << 34,
        layers_ready=4,
        layers=LAYERS,
    ),
    "ready": pb.Ready(activation_endpoint="10.0.0.2:7701", layers=LAYERS, memory_bytes_used=3 << 30),
    "released": pb.Released(),
    "status": pb.Status(
        state=pb.STAGE_STATE_READY,
        healthy=True,
        holder_coordinator_id="c",
        holder_term=7,
        run_id="run-1",
        lease_remaining_ms=12_000,
        loaded_layers=LAYERS,
        memory_total_bytes=64 << 30,
        memory_free_bytes=20 << 30,
        activation_endpoint="10.0.0.2:7701",
        version="0.1.0",
    ),
    "rejected": pb.Rejected(
        reason=pb.REJECT_REASON_STALE_TERM,
        message="claimed at term 7",
        holder_coordinator_id="coord-a",
        holder_term=7,
        lease_remaining_ms=9_000,
    ),
}


def oneof_fields(message_type, oneof: str) -> set[str]:
    return {f.name for f in message_type.DESCRIPTOR.oneofs_by_name[oneof].fields}


def test_every_oneof_variant_has_a_round_trip_case():
    assert set(REQUESTS) == oneof_fields(pb.StageControlRequest, "request")
    assert set(RESPONSES) == oneof_fields(pb.StageControlResponse, "response")


@pytest.mark.parametrize("variant", sorted(REQUESTS))
def test_request_variant_survives_serialization(variant):
    request = pb.StageControlRequest(
        coordinator_id="coord-a", term=3, run_id="run-1", **{variant: REQUESTS[variant]}
    )
    parsed = pb.StageControlRequest.FromString(request.SerializeToString())
    assert parsed == request
    assert parsed.WhichOneof("request") == variant
    assert getattr(parsed, variant) == REQUESTS[variant]
    assert (parsed.coordinator_id, parsed.term, parsed.run_id) == ("coord-a", 3, "run-1")


@pytest.mark.parametrize("variant", sorted(RESPONSES))
def test_response_variant_survives_serialization(variant):
    response = pb.StageControlResponse(**{variant: RESPONSES[variant]})
    parsed = pb.StageControlResponse.FromString(response.SerializeToString())
    assert parsed == response
    assert parsed.WhichOneof("response") == variant


def test_setting_a_second_variant_replaces_the_first():
    request = pb.StageControlRequest(claim=REQUESTS["claim"])
    request.release.SetInParent()
    assert request.WhichOneof("request") == "release"
    assert not request.HasField("claim")


def test_activation_frame_round_trips_its_tensor_bytes():
    data = bytes(range(256)) * 9  # 1 x 9 x 128 bf16 elements
    frame = activation_pb2.ActivationFrame(
        seq=42,
        batch=activation_pb2.BatchActivations(
            sessions=[activation_pb2.SessionRows(session_id="s-1", start_pos=17, token_count=9)],
            activations=activation_pb2.Activations(
                token_count=9, dtype=activation_pb2.WIRE_DTYPE_BF16, shape=[1, 9, 128], data=data
            ),
        ),
    )
    parsed = activation_pb2.ActivationFrame.FromString(frame.SerializeToString())
    assert parsed.WhichOneof("body") == "batch"
    assert (parsed.seq, parsed.batch.sessions[0].start_pos, list(parsed.batch.activations.shape)) == (
        42,
        17,
        [1, 9, 128],
    )
    assert parsed.batch.activations.data == data


def test_the_retired_single_session_fields_stay_reserved():
    file = descriptor_pb2.FileDescriptorProto()
    activation_pb2.DESCRIPTOR.CopyToProto(file)
    messages = {m.name: m for m in file.message_type}
    frame, activations = messages["ActivationFrame"], messages["Activations"]
    assert {"activations", "superseded"} <= set(frame.reserved_name)
    assert {(3, 4), (7, 8)} <= {(r.start, r.end) for r in frame.reserved_range}
    assert "start_pos" in activations.reserved_name
    assert (1, 2) in {(r.start, r.end) for r in activations.reserved_range}


# ---------------------------------------------------------------- real gRPC


class ClaimOnlyStage(stage_control_pb2_grpc.StageControlServicer):
    """Accepts every Claim for the lease asked; rejects everything else."""

    def Control(self, request, context):
        if request.WhichOneof("request") != "claim":
            return pb.StageControlResponse(
                rejected=pb.Rejected(reason=pb.REJECT_REASON_NOT_CLAIMED, message="send Claim first")
            )
        return pb.StageControlResponse(
            claim_accepted=pb.ClaimAccepted(lease_duration_ms=request.claim.lease_duration_ms)
        )


@pytest.fixture
def channel() -> Iterator[grpc.Channel]:
    """A channel to a real gRPC server on 127.0.0.1 serving the control service."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    stage_control_pb2_grpc.add_StageControlServicer_to_server(ClaimOnlyStage(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
            yield channel
    finally:
        server.stop(grace=None).wait(CALL_TIMEOUT_S)


def test_stage_answers_a_claim_with_claim_accepted_over_grpc(channel):
    stub = stage_control_pb2_grpc.StageControlStub(channel)
    request = pb.StageControlRequest(
        coordinator_id="coord-a", term=1, run_id="run-1", claim=REQUESTS["claim"]
    )
    response = stub.Control(request, timeout=CALL_TIMEOUT_S)
    assert response.WhichOneof("response") == "claim_accepted"
    assert response.claim_accepted.lease_duration_ms == 30_000


def test_stage_answers_an_unclaimed_prepare_with_rejected_over_grpc(channel):
    stub = stage_control_pb2_grpc.StageControlStub(channel)
    request = pb.StageControlRequest(
        coordinator_id="coord-a", term=1, run_id="run-1", prepare=REQUESTS["prepare"]
    )
    response = stub.Control(request, timeout=CALL_TIMEOUT_S)
    assert response.WhichOneof("response") == "rejected"
    assert response.rejected.reason == pb.REJECT_REASON_NOT_CLAIMED


class EchoHandler:
    """Answers every frame with itself, as a one-stage pipeline of identity layers would."""

    def answer(self, frame):
        return frame

    def close(self):
        pass


def test_an_activation_connection_carries_frames_larger_than_grpcs_default_limit():
    server = FrameServer("127.0.0.1:0", EchoHandler).start()
    try:
        connection = FrameConnection(f"127.0.0.1:{server.port}", budget=FrameBudget(CALL_TIMEOUT_S))
        hidden, tokens = 4096, 512  # 8 MiB of f32: above gRPC's 4 MiB default
        frames = [
            activation_pb2.ActivationFrame(
                seq=1,
                batch=activation_pb2.BatchActivations(
                    sessions=[activation_pb2.SessionRows(session_id="s-1", start_pos=0, token_count=tokens)],
                    activations=activation_pb2.Activations(
                        token_count=tokens,
                        dtype=activation_pb2.WIRE_DTYPE_F32,
                        shape=[1, tokens, hidden],
                        data=bytes(4 * tokens * hidden),
                    ),
                ),
            ),
            activation_pb2.ActivationFrame(session_id="s-1", seq=2, end_session=activation_pb2.EndSession()),
        ]
        replies = [connection.call(frame) for frame in frames]
        connection.close()
    finally:
        server.stop()
    assert [(r.seq, r.WhichOneof("body")) for r in replies] == [(1, "batch"), (2, "end_session")]
    assert len(replies[0].batch.activations.data) == 4 * tokens * hidden
