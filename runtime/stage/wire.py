"""Hidden states on the wire: mlx arrays to `BatchActivations` messages and back, checked; each
session's rows with their tree and the compaction of its previous one (`Rows`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from layerline.errors import LayerlineError
from layerline.proto import activation_pb2 as pb

WIRE_DTYPES = {"f32": pb.WIRE_DTYPE_F32, "f16": pb.WIRE_DTYPE_F16, "bf16": pb.WIRE_DTYPE_BF16}
_ITEMSIZE = {pb.WIRE_DTYPE_F32: 4, pb.WIRE_DTYPE_F16: 2, pb.WIRE_DTYPE_BF16: 2}


class FrameError(LayerlineError):
    """An activation frame that does not fit the loaded model; the stage refuses it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# Rows a peer takes in one frame, and so in one pass, when its Load leaves BatchConfig unset;
# stage 0 always sets it, to the rows of its own passes (decode.targets.PREFILL_STEP).
DEFAULT_MAX_FRAME_ROWS = 4096


@dataclass(frozen=True)
class FrameLimits:
    hidden_size: int
    max_tokens: int  # positions in one frame

    def max_bytes(self) -> int:
        return self.max_tokens * self.hidden_size * 4


def wire_dtype(name: str) -> int:
    """The WireDtype enum value for `f32`, `f16` or `bf16`."""
    if name not in WIRE_DTYPES:
        raise LayerlineError(f"unknown wire dtype {name!r}; choose one of {', '.join(WIRE_DTYPES)}")
    return WIRE_DTYPES[name]


def _encode(hidden, dtype: int) -> pb.Activations:
    """An mlx array of shape (1, L, D) as an Activations message in `dtype`."""
    import mlx.core as mx

    if dtype == pb.WIRE_DTYPE_F32:
        wire = hidden.astype(mx.float32)
    elif dtype == pb.WIRE_DTYPE_F16:
        wire = hidden.astype(mx.float16)
    elif dtype == pb.WIRE_DTYPE_BF16:
        wire = hidden.astype(mx.bfloat16).view(mx.uint16)
    else:
        raise LayerlineError(f"cannot encode activations as wire dtype {dtype}")
    _, length, _ = hidden.shape
    # One copy: the bytes field is built straight from the array's buffer.
    return pb.Activations(token_count=length, dtype=dtype, shape=list(hidden.shape),
                          data=bytes(memoryview(wire)))


def _decode(message: pb.Activations, limits: FrameLimits):
    """The mlx array in an Activations message, after checking it against the model."""
    import mlx.core as mx

    if message.dtype not in _ITEMSIZE:
        raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                         f"unknown wire dtype {message.dtype}; expected f32, f16 or bf16")
    shape = list(message.shape)
    expected = [1, message.token_count, limits.hidden_size]
    if shape != expected:
        raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                         f"frame shape {shape} does not match the model: expected {expected} "
                         f"(batch 1, token_count, hidden_size)")
    if not 1 <= message.token_count <= limits.max_tokens:
        raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                         f"frame carries {message.token_count} positions; this stage takes 1 to "
                         f"{limits.max_tokens}")
    size = message.token_count * limits.hidden_size * _ITEMSIZE[message.dtype]
    if len(message.data) != size:
        raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                         f"frame has {len(message.data)} bytes of data; its shape and dtype need {size}")
    if message.dtype == pb.WIRE_DTYPE_F32:
        array = mx.array(np.frombuffer(message.data, dtype=np.float32).reshape(shape))
    elif message.dtype == pb.WIRE_DTYPE_F16:
        array = mx.array(np.frombuffer(message.data, dtype=np.float16).reshape(shape))
    else:
        array = mx.array(np.frombuffer(message.data, dtype=np.uint16).reshape(shape)).view(mx.bfloat16)
    return array


@dataclass(frozen=True)
class KeepPath:
    """The accepted path of a session's tree: its nodes (tree indices, root first) stay in the
    slots from `base` on, every other slot from `base` on goes."""

    base: int
    path: tuple[int, ...]


@dataclass(frozen=True)
class Rows:
    """One session's consecutive rows in a batch frame: a chain, or the last `count` nodes of the
    tree `parents`; `keep` compacts the session's previous tree first."""

    session_id: str
    start_pos: int  # the cache slot of the first row: the cache is truncated there
    count: int
    parents: tuple[int, ...] | None = None  # the whole tree, one entry a node; None: a chain
    keep: KeepPath | None = None

    @property
    def tree_base(self) -> int:
        """The cache slot of the tree's node 0 (the first row's for a chain)."""
        return self.start_pos + self.count - len(self.parents) if self.parents is not None else self.start_pos


def _session_rows(r: Rows) -> pb.SessionRows:
    keep = pb.KeepPath(base=r.keep.base, path=r.keep.path) if r.keep is not None else None
    return pb.SessionRows(session_id=r.session_id, start_pos=r.start_pos, token_count=r.count,
                          parents=r.parents or (), keep=keep)


def _rows(message: pb.SessionRows) -> Rows:
    keep = KeepPath(int(message.keep.base), tuple(message.keep.path)) if message.HasField("keep") else None
    return Rows(message.session_id, int(message.start_pos), int(message.token_count),
                tuple(message.parents) or None, keep)


def encode_batch(hidden, rows: list[Rows], dtype: int) -> pb.BatchActivations:
    """Rows of several sessions, (1, total rows, D), as a BatchActivations message."""
    return pb.BatchActivations(sessions=[_session_rows(r) for r in rows], activations=_encode(hidden, dtype))


def decode_batch(message: pb.BatchActivations, limits: FrameLimits):
    """The rows of a BatchActivations message, and its tensor, after checking both."""
    rows = [_rows(s) for s in message.sessions]
    if not rows:
        raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME, "a batch frame names no session")
    if any(not r.session_id or r.count < 1 for r in rows):
        raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                         "every session of a batch frame needs a session_id and at least one row")
    if len({r.session_id for r in rows}) != len(rows):
        raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME, "a session appears twice in one batch frame")
    total = sum(r.count for r in rows)
    if total != message.activations.token_count:
        raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                         f"a batch frame's sessions have {total} rows but its activations carry "
                         f"{message.activations.token_count}")
    return rows, _decode(message.activations, limits)


def frame_positions(frame: pb.ActivationFrame) -> int:
    """Positions a request frame makes the stages compute (what its time budget grows with)."""
    return frame.batch.activations.token_count if frame.WhichOneof("body") == "batch" else 1
