"""The model's two ends, which stage 0 holds: the token embedding, the final norm and the output head."""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from layerline.packager.architectures import model_module
from layerline.packager.package import LayerPackage

from .package_tensors import apply_plan, load_into, read_verified
from .weights_policy import WeightsPlan

log = logging.getLogger("layerline.runtime")


class Head(nn.Module):
    """Token ids in (`embed`), logits out (`logits`): everything of the model but its layers."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        module = model_module(config["model_type"])
        args = module.ModelArgs.from_dict({**config, "num_hidden_layers": 1})
        # Lazy arrays: the one block this builds is never evaluated and is dropped with `whole`.
        whole = module.Model(args)
        self.embed_tokens = whole.model.embed_tokens
        self.norm = whole.model.norm
        self.tie_word_embeddings = bool(args.tie_word_embeddings)
        if not self.tie_word_embeddings:
            self.lm_head = whole.lm_head
        self.vocab_size = int(args.vocab_size)
        self.context_length = int(config.get("max_position_embeddings") or 0) or None

    @classmethod
    def load(cls, package: LayerPackage, plan: WeightsPlan) -> Head:
        """Build stage 0's tensors and load the (sha256-verified) embed and head files."""
        manifest = package.manifest
        head = cls(manifest.config)
        files = [manifest.shared["embed"], manifest.shared["head"]]
        weights: dict[str, mx.array] = {}
        for tensors in read_verified(package, files):
            for name, value in apply_plan(tensors, plan, manifest.quantization).items():
                # Files use whole-model names (`model.norm.weight`); this module is flat.
                weights[name.removeprefix("model.")] = value
        if head.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        # This module's paths are the files' less `model.` (`embed_tokens`), but for `lm_head`.
        load_into(head, weights, manifest.quantization,
                  lambda path: path if path.startswith("lm_head") else f"model.{path}")
        log.info("head embed+head vocab=%d weights=%s", head.vocab_size, plan.format)
        return head

    def embed(self, tokens: mx.array) -> mx.array:
        """Token ids (B, L) -> hidden states (B, L, D)."""
        return self.embed_tokens(tokens)

    def logits(self, h: mx.array) -> mx.array:
        """Hidden states (B, L, D) from the last layer -> logits (B, L, vocab)."""
        h = self.norm(h)
        if self.tie_word_embeddings:
            return self.embed_tokens.as_linear(h)
        return self.lm_head(h)
