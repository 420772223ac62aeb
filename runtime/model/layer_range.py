"""Transformer blocks [start, end) of a package, built by mlx-lm with only those layers.

A range takes hidden states (B, L, D) and its KV caches and returns hidden
states; embedding, final norm and head belong to stage 0 (`head.py`). Only
the range's layer files are read and verified, and nothing of the other layers
is ever allocated, so memory grows with the range, not the model.

The blocks are mlx-lm's own, cut from the whole model it builds (lazily), so a
block keeps its global index (Gemma 3 picks its attention kind and RoPE base by
it). Which blocks attend within a sliding window, and how wide, comes from the
model's `make_cache`; their caches here are `SlidingWindowCache`s, which, unlike
mlx-lm's rotating ones, can roll back rejected draft positions.
"""

from __future__ import annotations

import logging
from itertools import accumulate
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.rope_utils import DynamicNTKScalingRoPE

from layerline.errors import LayerRangeError
from layerline.packager.architectures import LAYER_PREFIX, build_model, get_architecture, model_module
from layerline.packager.package import LayerPackage

from .attention import attention, route_attention
from .kv_cache import SlidingWindowCache
from .package_tensors import apply_plan, load_into, read_verified
from .session_rows import SessionRows, joint_mask, tree_masks
from .tree import Tree, TreeError, check_tree
from .weights_policy import WeightsPlan

log = logging.getLogger("layerline.runtime")


def check_range(start: int, end: int, num_layers: int) -> None:
    """Raise LayerRangeError unless 0 <= start < end <= num_layers."""
    if not (0 <= start < end <= num_layers):
        raise LayerRangeError(
            f"layer range {start}:{end} is outside the model's {num_layers} layers",
            hint=f"choose START:END with 0 <= START < END <= {num_layers}",
        )


def attention_windows(model: Any) -> list[int | None]:
    """Per block of an mlx-lm model: its sliding attention window, or None where it attends to
    every position, read from the caches the model makes for itself."""
    if not hasattr(model, "make_cache"):
        return [None] * len(model.layers)
    windows: list[int | None] = []
    for cache in model.make_cache():
        if isinstance(cache, RotatingKVCache):
            windows.append(int(cache.max_size))
        elif isinstance(cache, KVCache):
            windows.append(None)
        else:
            raise LayerRangeError(
                f"{type(model).__module__} keeps a {type(cache).__name__} per block, which layer "
                "ranges cannot split yet", hint="use a transformer with attention caches only")
    return windows


class LayerRange(nn.Module):
    def __init__(self, config: dict[str, Any], start: int, end: int) -> None:
        super().__init__()
        check_range(start, end, config["num_hidden_layers"])
        self._module = model_module(config["model_type"])
        route_attention(self._module)
        # mlx arrays are lazy: the embedding, head and other blocks this builds are never
        # evaluated, and are dropped with `whole`; only the range's blocks are kept.
        whole = build_model(config)
        self.layers = list(whole.layers[start:end])
        self.start, self.end = start, end
        self.hidden_size = int(config["hidden_size"])
        self._windows = attention_windows(whole)[start:end]
        self._array_masks = get_architecture(config["model_type"]).array_masks
        self._rows_batch = not any(isinstance(getattr(getattr(layer, "self_attn", None), "rope", None),
                                              DynamicNTKScalingRoPE) for layer in self.layers)

    @classmethod
    def load(cls, package: LayerPackage, start: int, end: int, plan: WeightsPlan) -> LayerRange:
        """Build the range and load its (sha256-verified) layer files in the planned format."""
        manifest = package.manifest
        check_range(start, end, manifest.num_layers)
        layer_range = cls(manifest.config, start, end)
        weights: dict[str, mx.array] = {}
        files = manifest.layer_files(start, end)
        for local, tensors in enumerate(read_verified(package, files)):
            prefix = f"{LAYER_PREFIX}{start + local}."
            for name, value in apply_plan(tensors, plan, manifest.quantization, prefix).items():
                weights[f"layers.{local}.{name}"] = value

        def model_path(path: str) -> str:  # `layers.0.mlp.up_proj` -> `model.layers.START.mlp.up_proj`
            _, local, rest = path.split(".", 2)
            return f"{LAYER_PREFIX}{start + int(local)}.{rest}"

        load_into(layer_range, weights, manifest.quantization, model_path)
        log.info("range=%d..%d layers=%d weights=%s", start, end, end - start, plan.format)
        return layer_range

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def make_cache(self) -> list[Any]:
        """Fresh per-layer caches: windowed for sliding-window layers, else growing."""
        return [KVCache() if window is None else SlidingWindowCache(window) for window in self._windows]

    def __call__(self, h: mx.array, cache: list[Any] | None = None) -> mx.array:
        """Run hidden states (B, L, D) through the range, extending `cache` by L positions."""
        B, L, D = h.shape
        if D != self.hidden_size:
            raise LayerRangeError(
                f"hidden states of width {D} reached layers {self.start}:{self.end}, which take "
                f"{self.hidden_size}",
                hint="feed this range the output of the range before it in the same package",
            )
        if cache is None:
            cache = [None] * len(self.layers)
        # One mask per attention kind, from the first cache of that kind, as mlx-lm's models do.
        masks: dict[int | None, Any] = {}
        for layer, layer_cache, window in zip(self.layers, cache, self._windows, strict=True):
            if window not in masks:
                masks[window] = create_attention_mask(h, layer_cache, window_size=window,
                                                      return_array=self._array_masks)
            h = layer(h, masks[window], cache=layer_cache)
        return h


    @property
    def supports_trees(self) -> bool:
        """Whether `forward_rows` can run tree rows: attention routed through layerline (not a
        module's own, as Gemma 2's soft-cap) and RoPE that takes one offset per row."""
        return self._rows_batch and self._routed

    @property
    def _routed(self) -> bool:
        return getattr(self._module, "scaled_dot_product_attention", None) is attention

    def forward_rows(self, h: mx.array, caches: list[list[Any]], counts: list[int],
                     trees: list[Tree | None] | None = None) -> mx.array:
        """Rows of several sessions (1, N, D) in one pass: `counts[i]` consecutive rows of the
        session whose per-layer caches are `caches[i]`, extending each by its rows. A session
        with a tree (`trees[i]`) brings its tree's last `counts[i]` nodes."""
        _, N, D = h.shape
        if sum(counts) != N or len(caches) != len(counts):
            raise LayerRangeError(f"a batch of {N} rows cannot be {counts} rows of {len(caches)} sessions")
        trees = trees if trees is not None and any(t is not None for t in trees) else None
        if trees is not None:
            self._check_trees(caches, counts, trees)
        elif len(counts) == 1:
            return self(h, caches[0])
        if not self._rows_batch or not self._routed:
            # Attention this module computes itself (Gemma 2's soft-cap) or a RoPE that needs one
            # offset: session by session, still in one evaluation.
            pieces = mx.split(h, list(accumulate(counts))[:-1], axis=1)
            return mx.concatenate([self(piece, cache) for piece, cache in zip(pieces, caches, strict=True)],
                                  axis=1)
        joint: dict[int | None, Any] = {}  # per attention window: the joint mask, from its first layer
        masks: dict[int | None, list[Any]] = {}  # per attention window: each tree session's mask
        for i, window in enumerate(self._windows):
            if window not in joint:
                layer_caches = [cache[i] for cache in caches]
                # A tree's rows see their ancestors only: sessions with trees attend one call each.
                joint[window] = None if trees else joint_mask(layer_caches, counts, window)
                masks[window] = tree_masks(layer_caches, counts, window, trees) if trees else None
        h = h.reshape(N, 1, D)
        for i, (layer, window) in enumerate(zip(self.layers, self._windows, strict=True)):
            rows = SessionRows([cache[i] for cache in caches], counts, window, joint[window], trees,
                               masks[window])
            h = layer(h, None, cache=rows)
        return h.reshape(1, N, D)

    def _check_trees(self, caches: list[list[Any]], counts: list[int], trees: list[Tree | None]) -> None:
        """Refuse trees this range cannot run, or whose earlier nodes the caches do not hold."""
        if not self.supports_trees:
            raise TreeError(f"layers {self.start}:{self.end} of this architecture cannot run a tree of rows "
                            "(its attention or RoPE is its own)", hint="verify a chain of drafts instead")
        for cache, n, tree in zip(caches, counts, trees, strict=True):
            if tree is None:
                continue
            check_tree(tree.parents, base=tree.base)
            held = int(cache[0].offset) if cache else 0
            if not 1 <= n <= len(tree) or held != tree.base + len(tree) - n:
                raise TreeError(f"a tree of {len(tree)} nodes from slot {tree.base} cannot bring its "
                                f"last {n} nodes to a cache of {held} slots",
                                hint="feed a tree's nodes in order, from its base")
