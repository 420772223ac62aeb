"""Placement: a stage's layer probe at claim time, and the split stage 0 plans from the reports."""

from __future__ import annotations

from layerline.packager.package import LayerPackage
from layerline.proto import stage_control_pb2 as pb
from layerline.runtime.model.layer_probe import probe_layer
from layerline.runtime.model.layer_shape import LayerShape, LayerTiming
from layerline.runtime.stage.model import load_stage_model
from layerline.runtime.stage.node import StageNode
from layerline.runtime.stage.probe_messages import shape_message, timing_from_message
from layerline.runtime.stage.split_plan import plan_split
from layerline.runtime.stage0.placement import StageReport, place

GIB = 1 << 30


def claim(node: StageNode, package: str, shape: LayerShape | None) -> pb.ClaimAccepted:
    message = pb.Claim(package=pb.PackageIdentity(ref=package), lease_duration_ms=5000)
    if shape is not None:
        message.probe_shape.CopyFrom(shape_message(shape))
    request = pb.StageControlRequest(coordinator_id="coord", term=1, run_id="run", claim=message)
    response = node.handle(request)
    assert response.WhichOneof("response") == "claim_accepted", response
    return response.claim_accepted


def test_a_claim_with_a_probe_shape_times_a_real_layer_once_per_shape(tiny_llama_package, tmp_path):
    calls = []

    def counting_probe(shape: LayerShape) -> LayerTiming:
        calls.append(shape)
        return probe_layer(shape, budget_s=0.1)

    node = StageNode("127.0.0.1:0", tmp_path, load_stage_model, prober=counting_probe)
    shape = LayerShape.of(LayerPackage.open(tiny_llama_package).manifest, "auto")
    first = claim(node, str(tiny_llama_package), shape).probe
    timing = timing_from_message(first)
    assert timing is not None and first.error == ""
    assert timing.weight_format == "f32" and timing.layer_bytes >= shape.weights() * 4
    assert first.memory_free_bytes > 0
    again = claim(node, str(tiny_llama_package), shape).probe
    assert (again.one_row_us, again.batch_us) == (first.one_row_us, first.batch_us) and len(calls) == 1
    assert not claim(node, str(tiny_llama_package), None).HasField("probe")  # a renewal probes nothing


def test_a_shape_no_stage_could_hold_is_answered_with_an_error_not_a_refused_claim(tiny_llama_package,
                                                                                  tmp_path):
    node = StageNode("127.0.0.1:0", tmp_path, load_stage_model, prober=probe_layer)
    huge = LayerShape(65536, 64, 8, 1024, 65536)
    probe = claim(node, str(tiny_llama_package), huge).probe
    assert probe.error and timing_from_message(probe) is None


def _timing(layer_ms: float, layer_bytes: int = 10 << 20) -> LayerTiming:
    return LayerTiming(one_row_s=layer_ms / 2000, batch_s=layer_ms / 2000, batch_rows=16,
                       weight_format="f32", layer_bytes=layer_bytes)


def test_a_slower_peer_gets_fewer_layers_and_the_plan_says_why(smollm2_package):
    manifest = LayerPackage.open(smollm2_package).manifest
    shape = LayerShape.of(manifest, "auto")
    reports = [StageReport("local", 16 * GIB, _timing(1.0)), StageReport("a:1", 16 * GIB, _timing(1.0)),
               StageReport("b:1", 16 * GIB, _timing(4.0))]
    plan = place(manifest, shape, reports, context_length=4096, max_sessions=16)
    sizes = [e - s for s, e in plan.ranges]
    assert plan.source == "measured" and sum(sizes) == manifest.num_layers
    assert sizes[2] < sizes[1] and sizes[2] < sizes[0]
    status = plan.to_json()
    assert "slowest stage" in status["reason"]
    assert [s["layer_ms"] for s in status["stages"]] == [1.0, 1.0, 4.0]
    assert status["stages"][0]["extra_ms"] > 0  # stage 0 also runs the head
    assert all(s["stage_ms"] is not None and s["max_layers"] >= s["layers"][1] - s["layers"][0]
               for s in status["stages"])


def test_memory_caps_bound_a_fast_stage_with_kv_headroom(smollm2_package):
    manifest = LayerPackage.open(smollm2_package).manifest
    shape = LayerShape.of(manifest, "auto")
    kv = shape.kv_bytes_per_position() * 4096 * 16
    small = int((5 * (kv + (10 << 20)) + (100 << 20)) / 0.8)  # about five layers with their KV caches
    reports = [StageReport("local", 16 * GIB, _timing(4.0)), StageReport("a:1", small, _timing(0.5)),
               StageReport("b:1", 16 * GIB, _timing(4.0))]
    plan = place(manifest, shape, reports, context_length=4096, max_sessions=16)
    assert plan.source == "measured"
    assert plan.ranges[1][1] - plan.ranges[1][0] <= 5


def test_a_peer_without_a_probe_is_planned_from_free_memory_as_before(smollm2_package):
    manifest = LayerPackage.open(smollm2_package).manifest
    shape = LayerShape.of(manifest, "auto")
    free = [16 * GIB, 16 * GIB, 8 * GIB]
    reports = [StageReport("local", free[0], _timing(1.0)), StageReport("a:1", free[1], _timing(1.0)),
               StageReport("old:1", free[2], None, "the stage reports no probe (an older layerline)")]
    plan = place(manifest, shape, reports, context_length=4096, max_sessions=16)
    assert plan.source == "memory" and "old:1" in plan.reason
    assert plan.ranges == plan_split(manifest.num_layers, free)
