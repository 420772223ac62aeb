"""A stage's layers with one KV cache per session, as the activation path drives them.

A frame at `start_pos` below a session's cache length first truncates the cache
there (rejected draft positions roll back with no extra round trip); a frame
past the end is a gap and is refused.

A session's rows may be nodes of a token tree (`Rows.parents`); the frame after it may
carry the accepted path (`Rows.keep`), which the cache keeps in place of the tree before
anything else. The stage remembers the tree of each session's last frame, so a compaction
must name that tree and one of its root-to-node paths.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx

from layerline.errors import SessionLimitError
from layerline.packager.package import LayerPackage
from layerline.proto import activation_pb2 as pb

from ..model.kv_cache import RangeCache, SessionStore
from ..model.layer_range import LayerRange
from ..model.tree import Tree, TreeError, check_tree
from ..model.weights_policy import detect_device, plan_weights
from .node import LoadOptions
from .wire import FrameError, KeepPath, Rows

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
        self._trees: dict[str, Tree] = {}  # per session: the tree its last frame carried, if any

    def forward_batch(self, rows: list[Rows], hidden: mx.array) -> mx.array:
        """Run the rows of several sessions (1, total rows, D) in one pass, each a chain or its
        tree's nodes, after compacting each session's previous tree as `Rows.keep` says; every
        session is checked before any cache changes, so a refused batch leaves them all as they
        were."""
        new = [r.session_id for r in rows if r.session_id not in self.sessions]
        if len(self.sessions) + len(new) > self.sessions.max_sessions:
            raise FrameError(pb.ACTIVATION_ERROR_CODE_TOO_MANY_SESSIONS,
                             f"this stage holds {len(self.sessions)} of its {self.sessions.max_sessions} "
                             f"sessions; {len(new)} more cannot start (retry when a request ends, or "
                             "raise --max-sessions)")
        keeps = [self._check(r) for r in rows]
        caches = []
        for r, keep in zip(rows, keeps, strict=True):
            try:
                cache = self.sessions.get_or_create(r.session_id)
            except SessionLimitError as exc:
                raise FrameError(pb.ACTIVATION_ERROR_CODE_TOO_MANY_SESSIONS, exc.message) from exc
            if keep is not None and keep.path:
                cache.keep_path(keep.base, keep.path)
            cache.truncate(min(r.start_pos, cache.length))  # an empty path: back to the tree's base
            caches.append(cache.caches)
        trees = [Tree(r.tree_base, r.parents) if r.parents is not None else None for r in rows]
        out = self.layers.forward_rows(hidden.astype(self.compute_dtype), caches, [r.count for r in rows],
                                       trees=trees)
        mx.eval(out)
        for r, tree in zip(rows, trees, strict=True):
            if tree is not None:
                self._trees[r.session_id] = tree
            else:
                self._trees.pop(r.session_id, None)
        return out

    def _check(self, rows: Rows) -> KeepPath | None:
        """Refuse rows that would skip positions, pass the context, roll back out of reach, or
        run a tree or compaction this stage cannot; the compaction to make first, cut at the
        rows' start_pos (None: none, or one the rows roll back past)."""
        session_id, start_pos = rows.session_id, rows.start_pos
        cache = self.sessions.get(session_id) if session_id in self.sessions else None
        held = cache.length if cache is not None else 0
        if rows.parents is not None:
            self._check_tree(rows)
        keep = self._check_keep(rows, cache) if rows.keep is not None else None
        if rows.keep is not None and start_pos >= rows.keep.base:
            held = rows.keep.base + len(rows.keep.path)  # what the cache holds once compacted
        if start_pos > held:
            raise FrameError(pb.ACTIVATION_ERROR_CODE_POSITION_GAP,
                             f"session {session_id} holds {held} positions here; a frame at "
                             f"{start_pos} would leave a gap (re-send the prefix from position 0)")
        if rows.parents is None and start_pos + rows.count > self.context_length:
            raise FrameError(pb.ACTIVATION_ERROR_CODE_CONTEXT_FULL,
                             f"session {session_id} would reach position {start_pos + rows.count}, past "
                             f"the context length {self.context_length}")
        if keep is None and cache is not None and start_pos < held and not cache.can_truncate(start_pos):
            # Past a sliding window's reach: start again.
            raise FrameError(pb.ACTIVATION_ERROR_CODE_POSITION_GAP,
                             f"session {session_id} cannot roll back from {held} to "
                             f"{start_pos} here (a sliding-window cache keeps only so many "
                             "positions past its window); re-send the prefix from position 0")
        return keep

    def _check_tree(self, rows: Rows) -> None:
        """Refuse a tree that is malformed, too big, deeper than the context, or sent to layers
        that cannot run one."""
        assert rows.parents is not None
        session_id, nodes = rows.session_id, len(rows.parents)
        if not self.layers.supports_trees:
            raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                             f"session {session_id} sent a tree of rows, but layers {self.layers.start}:"
                             f"{self.layers.end} of this architecture cannot run one (its attention or "
                             "RoPE is its own); verify chains of drafts with this model")
        if nodes < rows.count or rows.tree_base < 0:
            raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                             f"session {session_id}'s {rows.count} rows at slot {rows.start_pos} cannot be "
                             f"the last nodes of a tree of {nodes}; send one parent per node of the "
                             "tree, its rows last")
        try:
            depths = check_tree(rows.parents)
        except TreeError as exc:
            raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                             f"session {session_id}'s tree cannot be run: {exc.message}; {exc.hint}") from exc
        deepest = rows.tree_base + max(depths)
        if deepest >= self.context_length:
            raise FrameError(pb.ACTIVATION_ERROR_CODE_CONTEXT_FULL,
                             f"session {session_id}'s tree from position {rows.tree_base} reaches "
                             f"position {deepest}, past the context length {self.context_length}; "
                             "draft shallower trees near the end")

    def _check_keep(self, rows: Rows, cache: RangeCache | None) -> KeepPath | None:
        """The compaction `rows.keep` asks for, cut at the rows' start_pos, once it is checked
        against the session's last tree (None: the rows roll back past the tree's base)."""
        keep = rows.keep
        assert keep is not None
        session_id = rows.session_id
        tree = self._trees.get(session_id)
        if cache is None or tree is None or tree.base != keep.base:
            last = f"a tree at slot {tree.base}" if tree is not None else "no tree"
            raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                             f"session {session_id} asks to keep a path of a tree at slot {keep.base}, but "
                             f"its last frame here carried {last}; send the compaction with the frame "
                             "right after the tree's")
        path = list(keep.path)
        if path and path[-1] >= len(tree):
            raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                             f"session {session_id}'s accepted path {path} names a node its tree of "
                             f"{len(tree)} nodes does not have")
        if path and path != tree.path(path[-1]):
            raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                             f"session {session_id}'s accepted path {path} is not a root-to-node path of "
                             f"its tree (node {path[-1]}'s is {tree.path(path[-1])})")
        if rows.start_pos < keep.base:
            return None  # the rows roll back past the whole tree: truncating is all
        cut = path[:rows.start_pos - keep.base]
        possible = cache.can_keep_path(keep.base, cut) if cut else cache.can_truncate(keep.base)
        if not possible:
            raise FrameError(pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                             f"session {session_id}'s cache of {cache.length} slots cannot keep the path "
                             f"{cut} of its tree at slot {keep.base} (a sliding window moved past it); "
                             "re-send the prefix from position 0")
        return KeepPath(keep.base, tuple(cut))

    def drop_session(self, session_id: str) -> None:
        self.sessions.drop(session_id)
        self._trees.pop(session_id, None)

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
