"""Drafters propose the next tokens cheaply; the target decides which of them stand.

A drafter is told the whole committed sequence (prompt plus accepted tokens) at every
step and keeps its own state in step with it: whatever it processed that is not a prefix
of the committed sequence (rejected drafts) is forgotten, and committed tokens it has not
processed yet are replayed.

- `ModelDrafter`: a small model of the same tokenizer, in this process, with its own KV
  caches. It samples its drafts from q, the request's own sampling rule applied to its
  logits, and returns q so that sampled requests can use the rejection rule.
- `NgramDrafter`: prompt lookup, no model. It finds the most recent earlier occurrence of
  the longest n-gram that ends the context and proposes what followed it. Its proposal is
  a function of the context, so it returns no q (q is 1 on the proposed token).

Each also proposes a tree of drafts (`propose_tree`, draft_tree.py): the draft model grows
EAGLE-2's dynamic tree, one call per depth; the n-gram drafter branches on every earlier
match. A tree of width 1 is the chain `propose` drafts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import mlx.core as mx
import numpy as np

from ..model.kv_cache import RangeCache
from ..model.tree import Tree
from .draft_tree import DraftTree, TreeShape
from .sampling import SamplingParams
from .targets import PREFILL_STEP
from .token_distribution import padded_rows, probabilities, recent_tokens, request_key, scores

if TYPE_CHECKING:
    from ..model.head import Head

log = logging.getLogger("layerline.speculative")



class Drafter(Protocol):
    """Proposes up to k tokens that continue `committed`."""

    # Committed positions the last proposal fed before drafting: the last token (and a fully
    # accepted window's last draft) as a rule; the prompt, or what was committed while drafting
    # was off, when catching up. The loop times drafting only where this is small.
    replayed: int

    def propose(self, committed: list[int], k: int, *,
                until: Callable[[], bool] | None = None) -> tuple[list[int], mx.array | None]:
        """Up to k draft tokens and, for a random proposal, their distributions q (len, vocab).

        A drafter whose proposal is random must return the q it drew each token from; None
        means the proposal is a function of `committed` alone (q = 1 on each token). A
        drafter that spends time per token may stop after 2 once `until()` is true (the
        loop drafts the next window while a pass runs, until its answer is there).
        """
        ...

    def propose_tree(self, committed: list[int], shape: TreeShape) -> DraftTree:
        """A tree of drafts after `committed` within `shape`, rooted at committed[-1]; a drafter
        with nothing to branch on proposes its chain (`DraftTree.chain`)."""
        ...

    def sync(self, committed: list[int]) -> None:
        """Forget anything processed that is not a prefix of `committed` (cheap; no compute)."""
        ...


class DraftModel(Protocol):
    """A whole model in this process: `runtime.local_pipeline.LocalPipeline` is one."""

    head: Head  # its embedding and output head: `head.vocab_size` ids
    supports_trees: bool  # `forward_tree` can run a tree of rows

    def __call__(self, tokens: mx.array, caches: list[RangeCache]) -> mx.array: ...

    def forward_tree(self, tokens: mx.array, caches: list[RangeCache], tree: Tree) -> mx.array: ...

    def make_cache(self) -> list[RangeCache]: ...


def draw(logits: mx.array, history: mx.array, params: SamplingParams,
         key: mx.array) -> tuple[mx.array, mx.array | None, mx.array]:
    """A draft token from one row of logits (1, vocab) by the request's rule, lazily: (token,
    q the distribution it was drawn from or None when greedy, the next key)."""
    if params.greedy:
        return mx.argmax(scores(logits, history, params), axis=-1).astype(mx.uint32), None, key
    q = probabilities(logits, history, params)
    key, draw_key = mx.random.split(key)
    return mx.random.categorical(mx.log(q), axis=-1, key=draw_key).astype(mx.uint32), q, key


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


class ModelDrafter:
    """A draft model with its own caches, for one request at a time."""

    def __init__(self, model: DraftModel, params: SamplingParams, *,
                 context_length: int | None = None, prefill_step: int = PREFILL_STEP) -> None:
        self.model = model
        self.params = params
        self.context_length = context_length
        self.prefill_step = prefill_step
        self.vocab_size = model.head.vocab_size
        self.caches = model.make_cache()
        self.fed: list[int] = []  # the tokens whose keys and values the caches hold
        self.replayed = 0
        self._key = request_key(params.seed, stream=1)

    @property
    def length(self) -> int:
        """Positions the draft caches hold."""
        return self.caches[0].length if self.caches else len(self.fed)

    def sync(self, committed: list[int]) -> None:
        """Roll the caches back to the longest prefix they share with `committed`."""
        self._truncate(common_prefix(self.fed, committed))

    def propose(self, committed: list[int], k: int, *,
                until: Callable[[], bool] | None = None) -> tuple[list[int], mx.array | None]:
        """Draft up to k tokens after `committed` with the request's sampling rule (fewer, but at
        least 2, once `until()` is true)."""
        if self.context_length is not None:
            # Drafting k tokens feeds positions up to len(committed) + k - 2.
            k = min(k, self.context_length - len(committed) + 1)
        if k <= 0 or not committed:
            return [], None
        # Replay what the caches lack; the last committed token is always fed again, since
        # its logits are what the first draft comes from (after full acceptance: [d_K, bonus]).
        logits = self._catch_up(committed)
        self.fed = list(committed)
        history = recent_tokens(committed, self.params)
        tokens: list[mx.array] = []
        dists: list[mx.array] = []
        for i in range(k):
            token, q, self._key = draw(logits, history, self.params, self._key)
            if q is not None:
                dists.append(q)
            tokens.append(token)
            mx.async_eval(token)
            if until is not None and i >= 1:
                mx.eval(token)  # so that `until` is asked as the compute goes, not as the graph grows
                if until():
                    break
            if i + 1 < k:
                if self.params.repetition_penalty != 1.0:
                    history = recent_tokens(mx.concatenate([history, token]), self.params)
                logits = self.model(token[None], self.caches)[:, -1, :]
        drafted = mx.concatenate(tokens)
        q_all = mx.concatenate(dists) if dists else None
        mx.eval(drafted, *([] if q_all is None else [q_all]))
        proposal = drafted.tolist()
        self.fed.extend(proposal[:-1])
        return proposal, q_all

    def propose_tree(self, committed: list[int], shape: TreeShape) -> DraftTree:
        """EAGLE-2's dynamic tree after `committed`, depth by depth: each depth's frontier is one
        `forward_tree` call of the draft. Greedy requests keep, of every frontier node's likeliest
        children, the `width` of highest cumulative draft probability. Sampled requests share
        `width` draws among the frontier nodes of highest cumulative probability and draw each
        node's children i.i.d. from its q (what SpecInfer's rule needs), keeping every draw.
        Width 1, or a draft that cannot run trees, is `propose`'s chain."""
        depth = shape.depth
        if self.context_length is not None:
            depth = min(depth, self.context_length - len(committed) + 1)
        if depth <= 0 or not committed:
            return DraftTree.root_only(committed[-1])
        if shape.width == 1 or not self.model.supports_trees:
            drafts, q = self.propose(committed, depth)
            return DraftTree.chain(committed[-1], drafts, q)
        logits = self._catch_up(committed)
        base = len(committed)  # the draft's tree starts after the root, which it holds

        def frontier(tokens: list[int], tree: Tree) -> mx.array:
            return self.model.forward_tree(mx.array([tokens], dtype=mx.uint32), self.caches, tree)[0]

        tree, fed, self._key = grow_tree(logits, committed, TreeShape(depth, shape.width, shape.budget),
                                         self.params, self._key, self.vocab_size, frontier)
        # Back to the committed prefix: the draft's caches hold it alone again.
        self.fed = list(committed) + list(tree.tokens[1:1 + fed])
        self._truncate(base)
        return tree

    def _catch_up(self, committed: list[int]) -> mx.array:
        """Roll the caches back to what they share with `committed` (all but its last token at
        most) and replay the rest: the logits (1, vocab) after committed[-1]."""
        self._truncate(min(common_prefix(self.fed, committed), len(committed) - 1))
        self.replayed = len(committed) - len(self.fed)
        return self._replay(committed[len(self.fed):])

    def _truncate(self, position: int) -> None:
        if position >= len(self.fed):
            return
        if all(c.can_truncate(position) for c in self.caches):
            for cache in self.caches:
                cache.truncate(position)
            del self.fed[position:]
            return
        # A rotating cache that wrapped cannot roll back: start over and replay from 0.
        log.debug("event=draft_cache_reset reason=untrimmable position=%d", position)
        keep = self.fed[:position]
        self.caches = self.model.make_cache()
        self.fed = []
        if keep:
            self._replay(keep)
            self.fed = keep

    def _replay(self, tokens: list[int]) -> mx.array:
        """Feed `tokens` in chunks; the logits (1, vocab) after the last one."""
        # An id past the draft's vocabulary (the target's may be larger) cannot be embedded:
        # feed 0 instead. Only the draft's guesses suffer; what it remembers stays `tokens`.
        tokens = [t if t < self.vocab_size else 0 for t in tokens]
        logits = None
        for start in range(0, len(tokens), self.prefill_step):
            chunk = mx.array([tokens[start:start + self.prefill_step]], dtype=mx.uint32)
            logits = self.model(chunk, self.caches)[:, -1, :]
            if start + self.prefill_step < len(tokens):
                mx.eval([c.state for rc in self.caches for c in rc.caches])
        assert logits is not None
        return logits


def grow_tree(logits: mx.array, committed: list[int], shape: TreeShape, params: SamplingParams,
              key: mx.array, vocab_size: int,
              frontier_logits: Callable[[list[int], Tree], mx.array]) -> tuple[DraftTree, int, mx.array]:
    """EAGLE-2's dynamic tree after `committed` from the draft's `logits` (1, vocab) after it:
    (the tree, drafted nodes the draft's caches then hold past the prefix, the next key).
    `frontier_logits(tokens, tree)` runs one depth's frontier (the last nodes of the draft's
    own tree, rooted after committed[-1]) and gives their logits (len(tokens), vocab)."""
    base = len(committed)
    context = params.repetition_context
    tokens, parents = [committed[-1]], [-1]
    histories = [committed[-context:]]
    cumulative = [0.0]  # log draft probability of each node's path
    draws: list[tuple[int, ...]] = [()]
    q_rows: dict[int, mx.array] = {}
    frontier = [0]
    fed = 0  # drafted nodes the draft's caches hold after the prefix
    for level in range(1, shape.depth + 1):
        room = min(shape.width, shape.budget - (len(tokens) - 1))
        if room <= 0:
            break
        history = padded_rows([histories[f] for f in frontier]) if params.repetition_penalty != 1.0 \
            else mx.zeros((0,), dtype=mx.uint32)
        if params.greedy:
            dist = mx.softmax(scores(logits, history, params), axis=-1)
            chosen = _likeliest_children(np.array(dist), [cumulative[f] for f in frontier], room)
        else:
            dist = probabilities(logits, history, params)
            counts = _share_draws([cumulative[f] for f in frontier], room)
            key, draw_key = mx.random.split(key)
            drawn = mx.random.categorical(mx.log(dist), num_samples=room, key=draw_key).tolist()
            picked = []
            for i, (f, count) in enumerate(zip(frontier, counts, strict=True)):
                if count:
                    draws[f] = tuple(drawn[i][:count])
                    q_rows[f] = dist[i]
                    picked += [(i, t) for t in dict.fromkeys(draws[f])]
            chosen = [(i, t, float(np.log(dist[i, t].item()))) for i, t in picked]
        new = []
        for i, token, logp in chosen:
            f = frontier[i]
            new.append(len(tokens))
            tokens.append(token)
            parents.append(f)
            histories.append((histories[f] + [token])[-context:])
            cumulative.append(cumulative[f] + logp)
            draws.append(())
        frontier = new
        if level == shape.depth or not new:
            break
        # The draft's own tree: its nodes are ours but the root (already in its caches).
        tree = Tree(base, tuple(p - 1 for p in parents[1:]))
        logits = frontier_logits([tokens[n] for n in new], tree)
        fed = len(tokens) - 1
    q = None
    if q_rows:
        zeros = mx.zeros((vocab_size,))
        q = mx.stack([q_rows.get(n, zeros) for n in range(len(tokens))])
    return DraftTree(tuple(tokens), tuple(parents), q, tuple(draws) if q is not None else ()), fed, key


def _likeliest_children(dist: np.ndarray, cumulative: list[float],
                        room: int) -> list[tuple[int, int, float]]:
    """Of every frontier row's children, the `room` of highest cumulative log probability:
    (row, token, log probability), best first."""
    logp = np.log(np.maximum(dist, 1e-30))
    top = np.argpartition(-logp, min(room, logp.shape[1]) - 1, axis=1)[:, :room]
    candidates = [(cumulative[i] + logp[i, t], i, int(t)) for i in range(len(cumulative)) for t in top[i]]
    candidates.sort(key=lambda c: -c[0])
    return [(i, t, float(logp[i, t])) for _, i, t in candidates[:room]]


def _share_draws(cumulative: list[float], draws: int) -> list[int]:
    """`draws` shared among frontier nodes by their path probability (D'Hondt: each next draw
    goes to the node whose probability per draw already given is highest)."""
    weights = np.exp(np.asarray(cumulative) - max(cumulative))
    counts = [0] * len(cumulative)
    for _ in range(draws):
        best = int(np.argmax(weights / (1 + np.asarray(counts))))
        counts[best] += 1
    return counts


class NgramDrafter:
    """Prompt lookup: continue the longest recent n-gram match of the context's end."""

    replayed = 0  # no model to catch up

    def __init__(self, *, min_ngram: int = 2, max_ngram: int = 4) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram
        self.seen: list[int] = []  # the sequence the index covers
        # n-gram -> starts of its occurrences that have a token after them, oldest first
        self._index: dict[tuple[int, ...], list[int]] = {}

    def sync(self, committed: list[int]) -> None:
        """Drop the index if `committed` does not extend what it covers."""
        if common_prefix(self.seen, committed) < len(self.seen):
            self.seen = []
            self._index = {}

    def propose(self, committed: list[int], k: int, *,
                until: Callable[[], bool] | None = None) -> tuple[list[int], mx.array | None]:
        """Up to k tokens that followed the latest match of the longest n-gram suffix."""
        self.sync(committed)
        self._extend(committed)
        if k <= 0:
            return [], None
        for n in range(min(self.max_ngram, len(committed) - 1), self.min_ngram - 1, -1):
            starts = self._index.get(tuple(committed[-n:]))
            if starts:
                return _copied(committed, starts[-1] + n, k), None
        return [], None

    def propose_tree(self, committed: list[int], shape: TreeShape) -> DraftTree:
        """What followed each earlier match of the context's end, as branches: the longest
        n-gram's latest match first (a chain of width 1 is `propose`'s), shared prefixes merged."""
        self.sync(committed)
        self._extend(committed)
        tokens, parents = [committed[-1]], [-1]
        child: dict[tuple[int, int], int] = {}  # (node, token) -> its child carrying the token
        per_depth = [0] * (shape.depth + 1)
        looked = 0
        for n in range(min(self.max_ngram, len(committed) - 1), self.min_ngram - 1, -1):
            for start in reversed(self._index.get(tuple(committed[-n:]), [])):
                node = 0
                for depth, token in enumerate(_copied(committed, start + n, shape.depth), start=1):
                    found = child.get((node, token))
                    if found is None:
                        if len(tokens) > shape.budget or per_depth[depth] == shape.width:
                            break
                        found = child[node, token] = len(tokens)
                        tokens.append(token)
                        parents.append(node)
                        per_depth[depth] += 1
                    node = found
                looked += 1
                # Enough when the tree is full; older matches of a common n-gram add little.
                if len(tokens) > shape.budget or looked == 4 * shape.budget:
                    return DraftTree(tuple(tokens), tuple(parents))
        return DraftTree(tuple(tokens), tuple(parents))

    def _extend(self, committed: list[int]) -> None:
        old, new = len(self.seen), len(committed)
        for n in range(self.min_ngram, self.max_ngram + 1):
            # An n-gram at i is indexed once a token follows it: i + n <= len - 1.
            for i in range(max(0, old - n), new - n):
                self._index.setdefault(tuple(committed[i:i + n]), []).append(i)
        self.seen = list(committed)


def _copied(committed: list[int], source: int, k: int) -> list[int]:
    """k tokens copied from `source` on, as LZ77 does: a match near the end runs on into the
    copy itself, which continues a repeating pattern."""
    extended = list(committed)
    for j in range(k):
        extended.append(extended[source + j])
    return extended[len(committed):]


class NoDrafter:
    """Proposes nothing: every step is one plain target pass."""

    replayed = 0

    def propose(self, committed: list[int], k: int, *,
                until: Callable[[], bool] | None = None) -> tuple[list[int], mx.array | None]:
        return [], None

    def propose_tree(self, committed: list[int], shape: TreeShape) -> DraftTree:
        return DraftTree.root_only(committed[-1])

    def sync(self, committed: list[int]) -> None:
        pass
