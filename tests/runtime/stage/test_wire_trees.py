"""A batch frame's trees and compactions on the wire: encoded, decoded, and chain frames as before."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from layerline.proto import activation_pb2 as pb
from layerline.runtime.stage.wire import FrameLimits, KeepPath, Rows, decode_batch, encode_batch

LIMITS = FrameLimits(hidden_size=8, max_tokens=64)


def round_trip(rows: list[Rows]) -> list[Rows]:
    total = sum(r.count for r in rows)
    hidden = mx.array(np.random.default_rng(0).standard_normal((1, total, 8)).astype(np.float32))
    wire = pb.BatchActivations.FromString(encode_batch(hidden, rows, pb.WIRE_DTYPE_F32).SerializeToString())
    decoded, array = decode_batch(wire, LIMITS)
    np.testing.assert_array_equal(np.array(array), np.array(hidden))
    return decoded


def test_trees_and_compactions_of_several_sessions_survive_the_wire():
    rows = [Rows("a", 7, 5, parents=(-1, 0, 0, 1, 2), keep=KeepPath(3, (0, 2))),
            Rows("b", 0, 4),  # a chain beside them, as before trees
            Rows("c", 12, 2, parents=(-1, 0, 0, 1), keep=None)]  # a tree's last two nodes
    assert round_trip(rows) == rows
    assert [r.tree_base for r in rows] == [7, 0, 10]


def test_a_chain_frame_carries_no_tree_fields():
    (rows,) = round_trip([Rows("s", 3, 2)])
    assert rows == Rows("s", 3, 2, parents=None, keep=None)
    message = encode_batch(mx.zeros((1, 2, 8)), [rows], pb.WIRE_DTYPE_F32).sessions[0]
    assert not message.parents and not message.HasField("keep")


def test_an_empty_accepted_path_still_says_there_is_a_compaction():
    for keep in (KeepPath(3, ()), KeepPath(0, ())):
        (rows,) = round_trip([Rows("s", 3, 1, keep=keep)])
        assert rows.keep == keep
