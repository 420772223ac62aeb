"""The token tree stage 0 drafts and the target verifies in one pass, and the shape that bounds it.

Node 0 is the root: the last committed token, which the target has not seen yet (the step
feeds it, as a chain step feeds it in front of its drafts). Every other node is a drafted
token; `parents[i] < i` is its parent's index (-1 for the root alone), so nodes come depth by
depth or in any order where a parent precedes its children. Siblings carry distinct tokens.
These are the target's tree indices (runtime/model/tree.py): node i is fed at position
`start_pos + depth(i)` in cache slot `start_pos + i`, where start_pos = len(committed) - 1.

For the sampled acceptance rule (tree_accept.py) each node also says how its children were
proposed: `q[i]`, the draft distribution they were drawn from i.i.d., and `draws[i]`, their
tokens in the order drawn (a token drawn twice is one node, but the rule tests it twice).
`q` None means every node's children are a function of the context alone (n-gram branches,
a greedy draft's top children): `draws[i]` then lists each child once, likeliest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import mlx.core as mx

from layerline.errors import LayerlineError

from ..model.tree import MAX_TREE_NODES


class TreeShapeError(LayerlineError):
    """A tree shape's depth, width or node budget is out of range."""


@dataclass(frozen=True)
class TreeShape:
    """How big a drafted tree may grow: `depth` levels below the root, at most `width` nodes at
    each depth, at most `nodes` drafted nodes in all (the root not counted)."""

    depth: int
    width: int
    nodes: int = 0  # 0: depth x width, up to what one tree may hold

    def __post_init__(self) -> None:
        if self.depth < 1 or self.width < 1:
            raise TreeShapeError(f"tree depth {self.depth} and width {self.width} must be at least 1",
                                 hint="e.g. --tree 4,2 (depth 4, two nodes per depth)")
        if not 0 <= self.nodes <= MAX_TREE_NODES - 1:
            raise TreeShapeError(f"a tree of {self.nodes} drafted nodes is more than one pass verifies",
                                 hint=f"give at most {MAX_TREE_NODES - 1} nodes (the root is one more)")

    @property
    def budget(self) -> int:
        """Drafted nodes at most."""
        return self.nodes or min(self.depth * self.width, MAX_TREE_NODES - 1)

    @classmethod
    def parse(cls, text: str) -> TreeShape:
        """`DEPTH,WIDTH[,NODES]`, as `layerline run --tree` takes it."""
        parts = text.split(",")
        try:
            numbers = [int(part) for part in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3):
            raise TreeShapeError(f"tree shape {text!r} is not DEPTH,WIDTH[,NODES]",
                                 hint="e.g. --tree 4,2 or --tree 6,3,16")
        return cls(*numbers)


TREE_SETTINGS = ("off", "auto")  # besides a shape "D,W[,N]"


def check_tree_setting(text: str) -> str:
    """A served `tree` setting: "off", "auto" (sized by cost), or a fixed shape "D,W[,N]"."""
    if text not in TREE_SETTINGS:
        try:
            TreeShape.parse(text)
        except TreeShapeError as exc:
            raise TreeShapeError(f"tree {text!r}: {exc.message}; give off, auto or DEPTH,WIDTH[,NODES]",
                                 hint="e.g. tree = \"auto\" or tree = \"4,2\"") from exc
    return text


@dataclass(frozen=True)
class DraftTree:
    """A drafted tree: node 0 the root (the last committed token), then the drafted nodes."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    q: mx.array | None = None  # (nodes, vocab): row i, what node i's children were drawn from
    draws: tuple[tuple[int, ...], ...] = ()  # per node: its children's tokens as proposed

    def __post_init__(self) -> None:
        if len(self.parents) != len(self.tokens) or not self.tokens or self.parents[0] != -1:
            raise ValueError("a draft tree needs one parent per token and the root (parent -1) first")
        if any(not 0 <= p < i for i, p in enumerate(self.parents) if i):
            raise ValueError(f"every drafted node's parent must come before it: {self.parents}")
        if not self.draws:
            object.__setattr__(self, "draws", tuple(tuple(self.tokens[c] for c in kids)
                                                    for kids in self.children))

    @classmethod
    def root_only(cls, root: int) -> DraftTree:
        """No drafts: the step is one plain token."""
        return cls((root,), (-1,))

    @classmethod
    def chain(cls, root: int, drafts: list[int], q: mx.array | None = None) -> DraftTree:
        """The one-branch tree of a chain of drafts; `q` (len(drafts), vocab) as `propose` returns it."""
        if q is not None:
            q = mx.concatenate([q[:len(drafts)], mx.zeros((1, q.shape[-1]), dtype=q.dtype)])
        return cls((root, *drafts), tuple(range(-1, len(drafts))), q)

    @property
    def size(self) -> int:
        """Drafted nodes (the root not counted)."""
        return len(self.tokens) - 1

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """Each node's children, in index order."""
        kids: list[list[int]] = [[] for _ in self.tokens]
        for i, parent in enumerate(self.parents[1:], start=1):
            kids[parent].append(i)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        """Each node's depth below the root (the root 0)."""
        depths = [0] * len(self.tokens)
        for i, parent in enumerate(self.parents[1:], start=1):
            depths[i] = depths[parent] + 1
        return tuple(depths)

    @property
    def depth(self) -> int:
        """The deepest node's depth."""
        return max(self.depths)

    def path(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included."""
        path = [node]
        while self.parents[path[-1]] != -1:
            path.append(self.parents[path[-1]])
        return path[::-1]

    def child(self, node: int, token: int) -> int | None:
        """The child of `node` carrying `token`, if there is one."""
        return next((c for c in self.children[node] if self.tokens[c] == token), None)

    def within(self, vocab: int) -> DraftTree:
        """The tree without nodes the target cannot embed (tokens >= vocab) and their subtrees;
        their draws stay (the rule rejects them), and q is cut or padded to `vocab`."""
        keep: list[int] = []
        index: dict[int, int] = {}
        for i, (token, parent) in enumerate(zip(self.tokens, self.parents, strict=True)):
            if i == 0 or (parent in index and token < vocab):
                index[i] = len(keep)
                keep.append(i)
        if len(keep) == len(self.tokens) and (self.q is None or self.q.shape[-1] == vocab):
            return self
        q = None if self.q is None else fit_vocab(self.q[mx.array(keep)], vocab)
        return DraftTree(tuple(self.tokens[i] for i in keep),
                         tuple(-1 if i == 0 else index[self.parents[i]] for i in keep),
                         q, tuple(self.draws[i] for i in keep))


def fit_vocab(rows: mx.array, vocab: int) -> mx.array:
    """Draft distributions over the target's vocabulary: cut or zero-padded."""
    size = rows.shape[-1]
    if size >= vocab:
        return rows[..., :vocab]
    return mx.concatenate([rows, mx.zeros((*rows.shape[:-1], vocab - size), dtype=rows.dtype)], axis=-1)
