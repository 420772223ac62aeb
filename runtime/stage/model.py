"""A stage's layers with one KV cache per session, as the activation path drives them.

A frame at `start_pos` below a session's cache length first truncates the cache
there (rejected draft positions roll back with no extra round trip); a frame
past the end is a gap and is refused.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx

from layerline.errors import SessionLimitError
from layerline.packager.package import LayerPackage
from layerline.proto import activation_pb2 as pb

from ..model.kv_cache import SessionStore
from ..model.layer_range import LayerRange
from ..model.weights_policy import detect_device, plan_weights
from .node import LoadOptions
from .wire import FrameError, Rows

log = logging.getLogger("layerline.stage")


class StageModel:
    """Layers [start, end) of a package over a store of per-session KV caches."""

    def __init__(self, layers: LayerRange, sessions: SessionStore, context_length: int,
                 compute_dtype: Any) -> None:
        self.layers = layers
        self.sessions = sessions
        self.context_length = context_length
        self.compute_dtype = compute_dtype
        self.hidden_size = layers.hidden_size

    def forward_batch(self, rows: list[Rows], hidden: mx.array) -> mx.array:
        """Run the rows of several sessions (1, total rows, D) in one pass; every session is
        checked before any cache changes, so a refused batch leaves them all as they were."""
        new = [r.session_id for r in rows if r.session_id not in self.sessions]
        if len(self.sessions) + len(new) > self.sessions.max_sessions:
            raise FrameError(pb.ACTIVATION_ERROR_CODE_TOO_MANY_SESSIONS,
                             f"this stage holds {len(self.sessions)} of its {self.sessions.max_sessions} "
                             f"sessions; {len(new)} more cannot start (retry when a request ends, or "
                             "raise --max-sessions)")
        for r in rows:
            self._check(r)
        caches = []
        for r in rows:
            try:
                cache = self.sessions.get_or_create(r.session_id)
            except SessionLimitError as exc:
                raise FrameError(pb.ACTIVATION_ERROR_CODE_TOO_MANY_SESSIONS, exc.message) from exc
            cache.truncate(min(r.start_pos, cache.length))
            caches.append(cache.caches)
        out = self.layers.forward_rows(hidden.astype(self.compute_dtype), caches, [r.count for r in rows])
        mx.eval(out)
        return out

    def _check(self, rows: Rows) -> None:
        """Refuse rows that would skip positions, pass the context, or roll back out of reach."""
        session_id, start_pos = rows.session_id, rows.start_pos
        cache = self.sessions.get(session_id) if session_id in self.sessions else None
        held = cache.length if cache is not None else 0
        if start_pos > held:
            raise FrameError(pb.ACTIVATION_ERROR_CODE_POSITION_GAP,
                             f"session {session_id} holds {held} positions here; a frame at "
                             f"{start_pos} would leave a gap (re-send the prefix from position 0)")
        if start_pos + rows.count > self.context_length:
            raise FrameError(pb.ACTIVATION_ERROR_CODE_CONTEXT_FULL,
                             f"session {session_id} would reach position {start_pos + rows.count}, past "
                             f"the context length {self.context_length}")
        if cache is not None and start_pos < held and not cache.can_truncate(start_pos):
            # Past a sliding window's reach: start again.
            raise FrameError(pb.ACTIVATION_ERROR_CODE_POSITION_GAP,
                             f"session {session_id} cannot roll back from {held} to "
                             f"{start_pos} here (a sliding-window cache keeps only so many "
                             "positions past its window); re-send the prefix from position 0")

    def drop_session(self, session_id: str) -> None:
        self.sessions.drop(session_id)

    def session_count(self) -> int:
        return len(self.sessions)

    def kv_cache_bytes(self) -> int:
        return self.sessions.nbytes

    def memory_bytes(self) -> int:
        return int(sum(v.nbytes for _, v in _parameters(self.layers)))


def _parameters(module: Any) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())


def load_stage_model(package: LayerPackage, options: LoadOptions) -> StageModel:
    """Load a stage's range in the planned weight format, with its session store."""
    manifest = package.manifest
    files = manifest.layer_files(options.start, options.end)
    plan = plan_weights(options.weight_format, manifest, files, detect_device())
    layers = LayerRange.load(package, options.start, options.end, plan)
    context = options.context_length or int(manifest.config.get("max_position_embeddings") or 4096)
    sessions = SessionStore(layers.make_cache, max_sessions=options.max_sessions)
    log.info("event=loaded layers=%d..%d context=%d sessions=%d %s", options.start, options.end,
             context, options.max_sessions, plan.describe())
    return StageModel(layers, sessions, context, getattr(mx, plan.compute_dtype))
