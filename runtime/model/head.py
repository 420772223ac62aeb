"""The model's two ends, which stage 0 holds: the token embedding, the final norm and the output head.

Stage 0 does what mlx-lm's whole model does before its first block and after its
last; where architectures differ there (Gemma scales the embedding by sqrt(D),
Gemma 2 soft-caps the logits, Granite scales both) `Architecture` says so.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from layerline.packager.architectures import build_model, get_architecture
from layerline.packager.package import LayerPackage

from .package_tensors import apply_plan, load_into, read_verified
from .weights_policy import WeightsPlan

log = logging.getLogger("layerline.runtime")


class Head(nn.Module):
    """Token ids in (`embed`), logits out (`logits`): everything of the model but its layers."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        arch = get_architecture(config["model_type"])
        # Lazy arrays: the blocks this builds are never evaluated and are dropped with `whole`.
        whole = build_model(config)
        self.embed_tokens = whole.model.embed_tokens
        self.norm = whole.model.norm
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", True)) or not hasattr(
            whole, "lm_head")
        if not self.tie_word_embeddings:
            self.lm_head = whole.lm_head
        # Plain floats, not arrays: a module's arrays are its parameters.
        self._embed_multiplier = arch.embed_multiplier(whole.args) if arch.embed_multiplier else None
        self._softcap = arch.logits_softcap(whole.args) if arch.logits_softcap else None
        self._divisor = arch.logits_divisor(whole.args) if arch.logits_divisor else None
        self.vocab_size = int(config["vocab_size"])
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
                  lambda path: path if path.startswith("lm_head") else f"model.{path}",
                  files=" and ".join(files))
        log.info("head embed+head vocab=%d weights=%s", head.vocab_size, plan.format)
        return head

    def embed(self, tokens: mx.array) -> mx.array:
        """Token ids (B, L) -> hidden states (B, L, D)."""
        h = self.embed_tokens(tokens)
        return h if self._embed_multiplier is None else h * self._embed_multiplier

    def logits(self, h: mx.array) -> mx.array:
        """Hidden states (B, L, D) from the last layer -> logits (B, L, vocab)."""
        h = self.norm(h)
        logits = self.embed_tokens.as_linear(h) if self.tie_word_embeddings else self.lm_head(h)
        if self._softcap is not None:
            logits = mx.tanh(logits / self._softcap) * self._softcap
        if self._divisor is not None:
            logits = logits / self._divisor
        return logits
