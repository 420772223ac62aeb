"""A whole model in one process: the head and one or more layer ranges, token ids in, logits out.

The ranges run one after another, each with its own caches, exactly as split
stages would; this is the single-process reference for split serving.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlx.core as mx

from layerline.packager.package import LayerPackage

from ..model.blas import load_fast_blas
from ..model.cpu_kernel import cpu_kernel
from ..model.head import Head
from ..model.kv_cache import RangeCache
from ..model.layer_range import LayerRange
from ..model.tokenizer import end_of_generation_ids, load_tokenizer
from ..model.tree import Tree
from ..model.weights_policy import WeightsPlan, detect_device, plan_weights
from ..stage.split_plan import check_split, parse_split

log = logging.getLogger("layerline.runtime")

Split = list[tuple[int, int]]


class LocalPipeline:
    def __init__(self, package: LayerPackage, head: Head, ranges: list[LayerRange],
                 tokenizer: Any, plan: WeightsPlan) -> None:
        self.package = package
        self.head = head
        self.ranges = ranges
        self.tokenizer = tokenizer
        self.plan = plan
        self.eos_token_ids = end_of_generation_ids(tokenizer, package) if tokenizer else ()

    @classmethod
    def load(cls, package_dir: str | Path, split: str | Split | None = None,
             weights: str = "auto", *, tokenizer: bool = True) -> LocalPipeline:
        """Open a package and load stage 0 and every range of `split` (default: one range)."""
        package = LayerPackage.open(package_dir)
        manifest = package.manifest
        if split is None or split == "":
            ranges: Split = [(0, manifest.num_layers)]
        elif isinstance(split, str):
            ranges = parse_split(split, manifest.num_layers)
        else:
            ranges = list(split)
        check_split(ranges, manifest.num_layers)
        files = [*manifest.layer_files(0, manifest.num_layers), manifest.shared["embed"],
                 manifest.shared["head"]]
        device = detect_device()
        plan = plan_weights(weights, manifest, files, device)
        log.info("%s %s %s %s", load_fast_blas().describe(), cpu_kernel().describe(), device.describe(),
                 plan.describe())
        loaded_tokenizer = load_tokenizer(package) if tokenizer else None
        head = Head.load(package, plan)
        layer_ranges = [LayerRange.load(package, start, end, plan) for start, end in ranges]
        return cls(package, head, layer_ranges, loaded_tokenizer, plan)

    @property
    def context_length(self) -> int | None:
        return self.head.context_length

    def make_cache(self) -> list[RangeCache]:
        """Fresh caches for one session: one RangeCache per range."""
        return [RangeCache(r.make_cache()) for r in self.ranges]

    def __call__(self, tokens: mx.array, caches: list[RangeCache], logits_from: int = 0) -> mx.array:
        """Token ids (B, L) -> logits (B, L - logits_from, vocab) of the rows from `logits_from`,
        extending every range's cache by L (the head skips the rows before: a prompt's)."""
        h = self.head.embed(tokens)
        for layer_range, cache in zip(self.ranges, caches, strict=True):
            h = layer_range(h, cache.caches)
        return self.head.logits(h[:, logits_from:] if logits_from else h)

    @property
    def supports_trees(self) -> bool:
        """Whether every range can run a tree of rows (`forward_tree`)."""
        return all(r.supports_trees for r in self.ranges)

    def forward_tree(self, tokens: mx.array, caches: list[RangeCache], tree: Tree) -> mx.array:
        """Token ids (1, L), the last L nodes of `tree` -> their logits (1, L, vocab): row i is the
        next-token distribution after node i's root-to-node path."""
        h = self.head.embed(tokens)
        for layer_range, cache in zip(self.ranges, caches, strict=True):
            h = layer_range.forward_rows(h, [cache.caches], [tokens.shape[1]], trees=[tree])
        return self.head.logits(h)
