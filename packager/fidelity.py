"""How faithful a package is: its logits against its source's, both in float32, on a fixed text.

The reference is the source dequantized to float32 (for a GGUF, what llama.cpp computes with);
the package's tensors are expanded to float32 exactly as the runtime's f32 path does, so the
figures measure the weights alone. Both run the whole model through mlx-lm, one after the
other: the measurement needs memory for the model in float32 (`--no-fidelity` skips it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from layerline.progress import step_progress

from .architectures import LAYER_PREFIX, build_model, whole_model_weights
from .manifest import Fidelity, Manifest
from .source import ModelSource

# Plain prose and a little code, as a served model sees both; cut to TEXT_TOKENS tokens.
FIDELITY_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening with a lamp and a notebook. "
    "He wrote down the ships that passed, the colour of the sea and the direction of the wind. "
    "Over forty years the notebooks filled a shelf, and scientists later used them to study how "
    "the coast had changed.\n\ndef mean(values):\n    return sum(values) / len(values)\n"
)
TEXT_TOKENS = 64
REFERENCE = "source dequantized to float32"


def measure_fidelity(root: Path, manifest: Manifest, source: ModelSource, tokenizer: Any,
                     *, quiet: bool = False) -> Fidelity:
    """Mean KL and top-1 agreement of the package at `root` against `source`, on FIDELITY_TEXT."""
    tokens = list(tokenizer.encode(FIDELITY_TEXT, add_special_tokens=False))[:TEXT_TOKENS]
    # A model with fewer embedding rows than its tokenizer has ids (a test's tiny model) would
    # read past its embedding: such ids wrap around, the same on both sides.
    vocab = int(manifest.config["vocab_size"])
    tokens = [t % vocab for t in tokens]
    steps = 2 * (manifest.num_layers + 2)
    with step_progress("measuring fidelity (float32 forward passes)", steps, quiet=quiet) as advance:
        reference = _logits(manifest.config, _source_weights(source, manifest, advance), tokens)
        package = _logits(manifest.config, _package_weights(root, manifest, advance), tokens)
    mean_kl, top1 = compare_logits(reference, package)
    return Fidelity(reference=REFERENCE, text_tokens=len(tokens), mean_kl=mean_kl, top1_agreement=top1)


def compare_logits(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference || other) per position in nats, share of positions whose argmax agrees)."""
    ref = _log_softmax(reference.astype(np.float64))
    got = _log_softmax(other.astype(np.float64))
    kl = (np.exp(ref) * (ref - got)).sum(axis=-1)
    agree = reference.argmax(axis=-1) == other.argmax(axis=-1)
    return float(max(kl.mean(), 0.0)), float(agree.mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _logits(config: dict[str, Any], weights: dict, tokens: list[int]) -> np.ndarray:
    """The logits (tokens, vocab) of the whole model holding `weights`, in float32."""
    import mlx.core as mx

    model = build_model(config)
    weights = whole_model_weights(model, config, weights)
    model.load_weights(list(weights.items()), strict=True)
    weights.clear()  # the model holds them now; nothing else should
    logits = np.array(model(mx.array(tokens)[None])[0].astype(mx.float32))
    del model
    mx.clear_cache()  # else mlx keeps the freed weights for reuse, and the next model comes on top
    return logits


def _source_weights(source: ModelSource, manifest: Manifest, advance: Callable[..., None]) -> dict:
    import mlx.core as mx

    weights: dict[str, mx.array] = {}

    def add(tensors: dict[str, np.ndarray], prefix: str = "") -> None:
        for name, values in tensors.items():
            weights[prefix + name] = mx.array(np.asarray(values, dtype=np.float32))
        mx.eval(list(weights.values()))
        advance()

    add(source.embed_tensors())
    for index in range(manifest.num_layers):
        add(source.layer_tensors(index), f"{LAYER_PREFIX}{index}.")
    add(source.head_tensors())
    return weights


def _package_weights(root: Path, manifest: Manifest, advance: Callable[..., None]) -> dict:
    """The package's tensors in float32, packed ones expanded with f32 scales (exact)."""
    import mlx.core as mx

    weights: dict[str, mx.array] = {}
    files = [(manifest.shared["embed"], ""),
             *[(path, f"{LAYER_PREFIX}{i}.") for i, path in sorted(manifest.layers.items())],
             (manifest.shared["head"], "")]
    for path, prefix in files:
        tensors = mx.load(str(root / path))
        for name, value in tensors.items():
            if name.endswith((".scales", ".biases")):
                continue
            base = name.removesuffix(".weight")
            if f"{base}.scales" in tensors:
                assert manifest.quantization is not None
                fmt = manifest.quantization.format_of(prefix + base)
                value = mx.dequantize(value, tensors[f"{base}.scales"].astype(mx.float32),
                                      tensors[f"{base}.biases"].astype(mx.float32),
                                      group_size=fmt.group_size, bits=fmt.bits)
            weights[prefix + name] = value.astype(mx.float32)
        mx.eval(list(weights.values()))
        advance()
    return weights
