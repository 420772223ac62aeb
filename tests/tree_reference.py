"""A token-tree target written from the definition: each node's row is its root-to-node path run
as a chain through a `LocalTarget`, and keeping a path feeds that path again. What the decode
loop's tree steps are tested against, and what the real tree pass must agree with."""

from __future__ import annotations

import mlx.core as mx

from layerline.runtime.decode.local_pipeline import LocalPipeline
from layerline.runtime.decode.targets import LocalTarget, PendingPass


class ChainTreeTarget:
    """A `LocalTarget` that verifies trees path by path (one chain pass per leaf)."""

    supports_trees = True

    def __init__(self, pipeline: LocalPipeline) -> None:
        self.inner = LocalTarget.open(pipeline)
        self.vocab_size = self.inner.vocab_size
        self.lazy = self.inner.lazy
        self.last_trace = None
        self.tree_passes: list[tuple[list[int], list[int], int]] = []  # (tokens, parents, start_pos)

    @property
    def length(self) -> int:
        return self.inner.length

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        return self.inner.forward(tokens, start_pos)

    def submit(self, tokens: list[int], start_pos: int, logits_from: int = 0) -> PendingPass:
        return self.inner.submit(tokens, start_pos, logits_from)

    def forward_lazy(self, token: mx.array, start_pos: int) -> mx.array:
        return self.inner.forward_lazy(token, start_pos)

    def rewind(self, position: int) -> None:
        self.inner.rewind(position)

    def submit_tree(self, tokens: list[int], parents: list[int], start_pos: int) -> PendingPass:
        """Row i: the logits after node i's path, from one chain pass along each leaf's path."""
        self.tree_passes.append((list(tokens), list(parents), start_pos))
        rows: list[mx.array | None] = [None] * len(tokens)
        leaves = set(range(len(tokens))) - set(parents)
        for leaf in sorted(leaves):
            path = _path(parents, leaf)
            logits = self.inner.forward([tokens[i] for i in path], start_pos)
            for j, node in enumerate(path):
                rows[node] = logits[j]
        self.inner.rewind(start_pos)
        return _Done(mx.stack(rows))

    def keep_path(self, start_pos: int, path: list[int]) -> None:
        """Feed the kept path again as a chain: the session then holds start_pos + len(path)."""
        tokens, _, tree_start = self.tree_passes[-1]
        assert tree_start == start_pos and self.inner.length == start_pos
        self.inner.forward([tokens[i] for i in path], start_pos)


def _path(parents: list[int], node: int) -> list[int]:
    path = [node]
    while parents[path[-1]] != -1:
        path.append(parents[path[-1]])
    return path[::-1]


class _Done:
    def __init__(self, logits: mx.array) -> None:
        self.logits = logits

    def result(self) -> mx.array:
        mx.eval(self.logits)
        return self.logits

    def discard(self) -> None:
        pass

    def ready(self) -> bool:
        return True
