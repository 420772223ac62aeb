"""Which nodes of a verified draft tree stand, and the token the target adds after them.

`logits` row i is the target's next-token distribution after node i's path (the root's row
follows the committed sequence). Every row is scored in one batch, with the request's own
rule (repetition penalty over the row's own history, top-k, top-p, min-p, temperature), as
the chain step scores its rows.

- Greedy: from the root, follow the child whose token is the row's argmax; where none is,
  the argmax itself is the target's token. The output is plain greedy decoding's.
- Sampled (SpecInfer's multi-candidate rejection, Miao et al. 2024): at a node with target
  distribution p, test its children in the order proposed. Children drawn i.i.d. from q:
  accept c with probability min(1, p(c) / q(c)), else p <- norm(max(0, p - q)). Children
  that are a function of the context (q None): accept c with probability p(c), else
  p <- p with c zeroed, renormalized. An accepted child's own row is the next node's p;
  when every child is rejected (or the node is a leaf) the target's token is drawn from p.
  Either way each token follows the target's sampling distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .draft_tree import DraftTree
from .sampling import SamplingParams
from .token_distribution import padded_rows, probabilities, scores

_NO_HISTORY = mx.zeros((0,), dtype=mx.uint32)  # what the penalty looks at when it is off


@dataclass(frozen=True)
class TreeVerdict:
    """What one tree step commits."""

    path: list[int]  # accepted nodes, root first: what the target keeps (`keep_path`)
    tokens: list[int]  # committed: the accepted drafts' tokens, then the target's own

    @property
    def accepted(self) -> int:
        """Drafted nodes that stood."""
        return len(self.path) - 1


def node_histories(committed: list[int], tree: DraftTree, params: SamplingParams) -> mx.array:
    """The penalty's history of each node's row (nodes, H): node i's row follows committed and
    the drafted tokens on i's path."""
    if params.repetition_penalty == 1.0:
        return _NO_HISTORY
    context = params.repetition_context
    histories: list[list[int]] = []
    for i, parent in enumerate(tree.parents):
        before = committed if parent == -1 else histories[parent]
        histories.append((before + ([] if parent == -1 else [tree.tokens[i]]))[-context:])
    return padded_rows(histories)


def accept_tree(logits: mx.array, committed: list[int], tree: DraftTree, params: SamplingParams,
                key: mx.array) -> tuple[TreeVerdict, mx.array]:
    """The step's verdict from the tree's rows of logits (nodes, vocab), and the next key."""
    rows = node_histories(committed, tree, params)
    if params.greedy:
        return greedy_verdict(mx.argmax(scores(logits, rows, params), axis=-1).tolist(), tree), key
    key, accept_key, draw_key = mx.random.split(key, 3)
    p = probabilities(logits, rows, params)
    draws = sum(len(d) for d in tree.draws)
    u = np.array(mx.random.uniform(shape=(max(draws, 1),), key=accept_key))
    q = None if tree.q is None else np.array(tree.q.astype(mx.float32), dtype=np.float64)
    path, residual = _walk(np.array(p.astype(mx.float32), dtype=np.float64), q, tree, u)
    chosen = mx.random.categorical(mx.log(mx.array(residual, dtype=mx.float32)), key=draw_key)
    return TreeVerdict(path, [tree.tokens[i] for i in path[1:]] + [int(chosen.item())]), key


def greedy_verdict(best: list[int], tree: DraftTree) -> TreeVerdict:
    """The longest path whose every node is its parent row's argmax (`best`), then that argmax."""
    node, path = 0, [0]
    while (child := tree.child(node, best[node])) is not None:
        node = child
        path.append(node)
    return TreeVerdict(path, [tree.tokens[i] for i in path[1:]] + [best[node]])


def _walk(p: np.ndarray, q: np.ndarray | None, tree: DraftTree,
          u: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The accepted path, and the distribution the target's token is drawn from after it."""
    vocab = p.shape[-1]
    offsets = np.cumsum([0, *(len(d) for d in tree.draws)])
    node, path = 0, [0]
    while True:
        target = p[node]
        for j, token in enumerate(tree.draws[node]):
            inside = token < vocab  # a token past the target's vocabulary has p = 0
            p_token = target[token] if inside else 0.0
            if q is None:
                if u[offsets[node] + j] < p_token:
                    break
                target = target.copy()
                if inside:
                    target[token] = 0.0
            else:
                if inside and u[offsets[node] + j] * q[node, token] < p_token:
                    break
                target = np.maximum(target - q[node], 0.0)
            total = target.sum()
            # Empty only through rounding (a rejection needs p(c) < q(c)): then p itself.
            target = target / total if total > 0 else p[node]
        else:
            return path, target
        node = tree.child(node, token)
        assert node is not None, "an accepted token is always one of the node's children"
        path.append(node)
