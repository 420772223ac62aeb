"""StageNode and ActivationRelay in one process, over a real tiny package."""

from __future__ import annotations

import numpy as np

from layerline.proto import activation_pb2 as act_pb
from layerline.proto import stage_control_pb2 as pb
from layerline.runtime.stage.activation import ActivationRelay
from layerline.runtime.stage.model import load_stage_model
from layerline.runtime.stage.node import StageNode

from helpers import Clock, batch_frame, older_stage0_frame


def request(**kwargs) -> pb.StageControlRequest:
    return pb.StageControlRequest(coordinator_id="coord", term=1, run_id="run", **kwargs)


def loaded_node(tiny_llama_package, tmp_path, clock) -> StageNode:
    node = StageNode("127.0.0.1:0", tmp_path, load_stage_model, clock=clock)
    claim = pb.Claim(package=pb.PackageIdentity(ref=str(tiny_llama_package)), lease_duration_ms=5000)
    assert node.handle(request(claim=claim)).WhichOneof("response") == "claim_accepted"
    node.handle(request(prepare=pb.Prepare(layers=pb.LayerRange(start=1, end=3))))
    node.preparation.wait(60)
    assert node.handle(request(inventory=pb.InventoryRequest())).inventory.state == \
        pb.INVENTORY_STATE_READY
    load = pb.StageLoadRequest(layers=pb.LayerRange(start=1, end=3), stage_index=1, stage_count=2,
                               wire_dtype=act_pb.WIRE_DTYPE_F32,
                               kv_cache=pb.KvCacheConfig(context_length=64, max_sessions=4))
    ready = node.handle(request(load=load))
    assert ready.WhichOneof("response") == "ready", ready
    return node


def hidden(seq: int, length: int) -> np.ndarray:
    return np.random.default_rng(seq).standard_normal((1, length, 64)).astype(np.float32)


def activations(session: str, seq: int, start: int, length: int) -> act_pb.ActivationFrame:
    """One session's rows, as stage 0 sends them: a batch of one."""
    return batch_frame(seq, [(session, start, hidden(seq, length))])


def test_load_before_prepare_is_rejected(tiny_llama_package, tmp_path):
    node = StageNode("127.0.0.1:0", tmp_path, load_stage_model)
    claim = pb.Claim(package=pb.PackageIdentity(ref=str(tiny_llama_package)), lease_duration_ms=5000)
    node.handle(request(claim=claim))
    answer = node.handle(request(load=pb.StageLoadRequest(layers=pb.LayerRange(start=0, end=2))))
    assert answer.rejected.reason == pb.REJECT_REASON_NOT_PREPARED


def test_a_lower_start_pos_rolls_the_session_back(tiny_llama_package, tmp_path):
    node = loaded_node(tiny_llama_package, tmp_path, Clock())
    relay = ActivationRelay(node)
    first = relay.answer(activations("s", 1, 0, 5))
    extend = relay.answer(activations("s", 2, 5, 3))   # positions 5..7
    redo = relay.answer(activations("s", 2, 5, 3))     # the same positions again: rolled back first
    assert first.WhichOneof("body") == extend.WhichOneof("body") == "batch"
    assert extend.batch.activations.data == redo.batch.activations.data
    assert node.loaded.model.sessions.get("s").length == 8


def test_lapsed_lease_frees_the_stage_and_its_model(tiny_llama_package, tmp_path):
    clock = Clock()
    node = loaded_node(tiny_llama_package, tmp_path, clock)
    assert node.status().state == pb.STAGE_STATE_READY
    clock.now += 6
    assert node.status().state == pb.STAGE_STATE_FREE
    answer = ActivationRelay(node).answer(activations("s", 1, 0, 2))
    assert answer.error.code == act_pb.ACTIVATION_ERROR_CODE_NOT_READY
    assert node.loaded is None


def test_a_single_session_frame_from_an_older_stage0_is_refused_with_the_fix(tiny_llama_package, tmp_path):
    node = loaded_node(tiny_llama_package, tmp_path, Clock())
    relay = ActivationRelay(node)
    answer = relay.answer(older_stage0_frame("s", 1, hidden(1, 2)))
    assert answer.seq == 1 and answer.WhichOneof("body") == "error"
    assert answer.error.code == act_pb.ACTIVATION_ERROR_CODE_BAD_FRAME
    assert "stage 0 runs an older layerline; update it" in answer.error.message
    assert "s" not in node.loaded.model.sessions
    assert relay.answer(activations("s", 2, 0, 2)).WhichOneof("body") == "batch"  # still serving
