"""A tree of rows: many guessed continuations of one session verified in one pass.

A tree covers consecutive cache slots from `base`, the absolute position of its root. Node
i is stored in slot base + i, sits at position base + depth(i) (its RoPE rotation), and
attends to the committed prefix [0, base) and to its ancestors and itself: so its row is
the model's answer after its root-to-node path, as if that path alone had been fed. A
chain is the one-branch tree, parents (-1, 0, 1, ...).

`parents[i]` is node i's parent (a tree index) or -1 for a node that continues the prefix
directly (the root). Parents come before their children, which rules out cycles too.
After the verdict the caller keeps one root-to-node path (`RangeCache.keep_path`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from layerline.errors import LayerlineError

# Nodes in one tree. A sliding-window cache keeps more than this beyond its window
# (kv_cache.ROLLBACK_POSITIONS), so that it can drop every node but a path.
MAX_TREE_NODES = 64


class TreeError(LayerlineError):
    """A tree of rows that cannot be run: a parent after its child, out of range, too big."""


@dataclass(frozen=True)
class Tree:
    """Nodes stored in slots base.. of a session's cache; parents per node (-1: the prefix)."""

    base: int
    parents: tuple[int, ...]

    @classmethod
    def chain(cls, base: int, length: int) -> Tree:
        """`length` positions in a row from `base`: the one-branch tree."""
        return cls(base, tuple(range(-1, length - 1)))

    def __len__(self) -> int:
        return len(self.parents)

    def depths(self) -> list[int]:
        """Each node's depth (0 for a node that continues the prefix)."""
        return depths(self.parents)

    def positions(self) -> list[int]:
        """Each node's absolute position: base + depth."""
        return [self.base + d for d in self.depths()]

    def path(self, node: int) -> list[int]:
        """The nodes from the root down to `node`, root first."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def depths(parents: Sequence[int]) -> list[int]:
    """Each node's depth; parents must already be checked (`check_tree`)."""
    out: list[int] = []
    for parent in parents:
        out.append(0 if parent < 0 else out[parent] + 1)
    return out


def check_tree(parents: Sequence[int], *, base: int = 0, context_length: int | None = None,
               max_nodes: int = MAX_TREE_NODES) -> list[int]:
    """Each node's depth, or TreeError when the tree cannot be run: a node whose parent is
    itself or comes after it (which a cycle needs), a parent out of range, more nodes than
    `max_nodes`, or a node placed past the context."""
    if not parents:
        raise TreeError("a tree needs at least one node", hint="send the root at least")
    if len(parents) > max_nodes:
        raise TreeError(f"a tree of {len(parents)} nodes is more than the {max_nodes} one pass takes",
                        hint=f"draft at most {max_nodes} nodes per step")
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            why = "comes after it" if parent >= i else "is not a node of the tree"
            raise TreeError(f"node {i}'s parent {parent} {why}",
                            hint="list a parent before its children; -1 marks a root")
    found = depths(parents)
    if context_length is not None and base + max(found) >= context_length:
        raise TreeError(f"a tree from position {base} reaches position {base + max(found)}, past the "
                        f"context length {context_length}", hint="draft shallower trees near the end")
    return found


def ancestry(parents: Sequence[int]) -> np.ndarray:
    """(nodes, nodes) booleans: [i, j] when node j is node i or one of its ancestors."""
    n = len(parents)
    seen = np.eye(n, dtype=bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            seen[i] |= seen[parent]
    return seen


def tree_mask(tree: Tree, rows: int, key_start: int, window: int | None) -> mx.array:
    """Which keys the tree's last `rows` nodes may see, over the cache's slots [key_start,
    base + len(tree)): the prefix (within `window` of the node's position) and the node's
    ancestors and itself."""
    n = len(tree)
    positions = np.asarray(tree.positions())
    seen = ancestry(tree.parents)[n - rows:]  # (rows, nodes)
    prefix = np.arange(key_start, tree.base)  # slots below base hold positions equal to them
    row_pos = positions[n - rows:, None]
    sees_prefix = np.broadcast_to(prefix[None] <= row_pos, (rows, len(prefix)))
    if window is not None:
        sees_prefix = sees_prefix & (prefix[None] > row_pos - window)
        seen = seen & (positions[None] > row_pos - window)
    return mx.array(np.concatenate([sees_prefix, seen], axis=1))
