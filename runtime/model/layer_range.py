"""Transformer blocks [start, end) of a package, built by mlx-lm with only those layers.

A range takes hidden states (B, L, D) and its KV caches and returns hidden
states; embedding, final norm and head belong to stage 0 (`head.py`). Only
the range's layer files are read and verified, and nothing of the other layers
is ever allocated, so memory grows with the range, not the model.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

from layerline.errors import LayerRangeError
from layerline.packager.architectures import LAYER_PREFIX, model_module
from layerline.packager.package import LayerPackage

from .package_tensors import apply_plan, load_into, read_verified
from .weights_policy import WeightsPlan

log = logging.getLogger("layerline.runtime")


def check_range(start: int, end: int, num_layers: int) -> None:
    """Raise LayerRangeError unless 0 <= start < end <= num_layers."""
    if not (0 <= start < end <= num_layers):
        raise LayerRangeError(
            f"layer range {start}:{end} is outside the model's {num_layers} layers",
            hint=f"choose START:END with 0 <= START < END <= {num_layers}",
        )


def range_config(config: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """The model's mlx-lm config narrowed to layers [start, end)."""
    narrowed = {**config, "num_hidden_layers": end - start}
    if isinstance(config.get("layer_types"), list):  # per-layer attention kinds follow the layers
        narrowed["layer_types"] = config["layer_types"][start:end]
    return narrowed


class LayerRange(nn.Module):
    def __init__(self, config: dict[str, Any], start: int, end: int) -> None:
        super().__init__()
        check_range(start, end, config["num_hidden_layers"])
        module = model_module(config["model_type"])
        args = module.ModelArgs.from_dict(range_config(config, start, end))
        # mlx arrays are lazy: the embedding and head this builds are never evaluated, and
        # are dropped with `whole`; only its blocks are kept.
        whole = module.Model(args)
        self.layers = list(whole.layers)
        self.start, self.end = start, end
        self.hidden_size = int(config["hidden_size"])
        self._sliding_window = getattr(args, "sliding_window", None)

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
        """Fresh per-layer caches: rotating windows for sliding-window layers, else growing."""
        return [RotatingKVCache(max_size=self._sliding_window) if getattr(layer, "use_sliding", False)
                else KVCache() for layer in self.layers]

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
        masks: dict[bool, Any] = {}
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            sliding = bool(getattr(layer, "use_sliding", False))
            if sliding not in masks:
                window = self._sliding_window if sliding else None
                masks[sliding] = create_attention_mask(h, layer_cache, window_size=window)
            h = layer(h, masks[sliding], cache=layer_cache)
        return h

