"""How far the CPU kernel's integer path (x quantized to int8 or int16) moves a package's output.

The same package is decoded on the kernel token by token (the one-row products the integer
path computes): with f32 x, the exact product, then with int8 x and with int16 x. The logits at
every position of the packager's fidelity text are compared as `pkg inspect` reports a
package's fidelity (mean KL, top-1 agreement), and a greedy decode is compared token for token.
With int16 x the text is also fed as one prompt chunk with the kernel's integer path for many
rows on (its 4-bit products: x to 14 bits per span, the weights' scales as integer sub-scales),
against the same chunk in f32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from layerline.packager.fidelity import FIDELITY_TEXT, TEXT_TOKENS, compare_logits
from layerline.packager.inspect import describe_fidelity
from layerline.packager.manifest import Fidelity

from ..decode.local_pipeline import LocalPipeline
from ..decode.loop import generate
from ..decode.sampling import SamplingParams
from ..decode.targets import LocalTarget
from ..model.cpu_kernel import cpu_kernel, gemv_x, integer_rows

REFERENCE = "the CPU kernel with f32 x"
GREEDY_PROMPT = "The history of computing is a story of"
GREEDY_TOKENS = 64


@dataclass(frozen=True)
class IntegerFidelity:
    package: str
    x: str  # "int8" or "int16"
    isa: str  # the integer path's instruction set
    fidelity: Fidelity
    greedy_tokens: int
    first_difference: int | None  # index of the first greedy token that differs, None if none
    chunk: Fidelity | None = None  # the text as one prompt chunk (many-row products), int16 x only

    def describe(self) -> str:
        """`int16 x (avx512-vnni): mean KL …, top-1 agreement … (vs …); greedy 64 tokens: the same`,
        and for int16 `; one chunk: mean KL …`."""
        greedy = ("the same" if self.first_difference is None
                  else f"differ from token {self.first_difference}")
        chunk = "" if self.chunk is None else f"; the text as one chunk: {describe_fidelity(self.chunk)}"
        return (f"{self.x} x ({self.isa}): {describe_fidelity(self.fidelity)}; "
                f"greedy {self.greedy_tokens} tokens: {greedy}{chunk}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _step_logits(pipeline: LocalPipeline, tokens: list[int]) -> np.ndarray:
    """Logits (tokens, vocab) of `tokens` fed one at a time, as decode steps."""
    target = LocalTarget.open(pipeline)
    rows = [np.array(target.forward([t], i)[0].astype(mx.float32)) for i, t in enumerate(tokens)]
    return np.stack(rows)


def _chunk_logits(pipeline: LocalPipeline, tokens: list[int]) -> np.ndarray:
    """Logits (tokens, vocab) of `tokens` fed as one prompt chunk."""
    return np.array(LocalTarget.open(pipeline).forward(tokens, 0).astype(mx.float32))


def _greedy(pipeline: LocalPipeline, prompt: list[int], tokens: int) -> list[int]:
    return [t.id for t in generate(LocalTarget.open(pipeline), prompt, SamplingParams(max_tokens=tokens))]


def measure_integer_fidelity(package_dir: str | Path, *, x_bits: tuple[int, ...] = (8, 16),
                             greedy_tokens: int = GREEDY_TOKENS) -> list[IntegerFidelity]:
    """Each integer x width against f32 x on `package_dir`, loaded packed on the kernel."""
    pipeline = LocalPipeline.load(package_dir, weights="packed")
    tokenizer = pipeline.tokenizer
    vocab = pipeline.head.vocab_size
    text = [t % vocab for t in tokenizer.encode(FIDELITY_TEXT, add_special_tokens=False)][:TEXT_TOKENS]
    prompt = list(tokenizer.encode(GREEDY_PROMPT))
    runs = {}
    with integer_rows(False):
        for bits in (None, *x_bits):
            with gemv_x(bits):
                runs[bits] = _step_logits(pipeline, text), _greedy(pipeline, prompt, greedy_tokens)
        exact_chunk = _chunk_logits(pipeline, text)  # every product has the chunk's rows: f32 x
    with integer_rows(True):
        rows_chunk = _chunk_logits(pipeline, text)
    exact_logits, exact_tokens = runs[None]
    results = []
    for bits in x_bits:
        logits, tokens = runs[bits]
        mean_kl, top1 = compare_logits(exact_logits, logits)
        first = next((i for i, (a, b) in enumerate(zip(exact_tokens, tokens, strict=False)) if a != b), None)
        if first is None and len(exact_tokens) != len(tokens):
            first = min(len(exact_tokens), len(tokens))
        fidelity = Fidelity(reference=REFERENCE, text_tokens=len(text), mean_kl=mean_kl, top1_agreement=top1)
        chunk = None
        if bits == 16:
            chunk_kl, chunk_top1 = compare_logits(exact_chunk, rows_chunk)
            chunk = Fidelity(reference=REFERENCE, text_tokens=len(text), mean_kl=chunk_kl,
                             top1_agreement=chunk_top1)
        results.append(IntegerFidelity(str(package_dir), f"int{bits}", cpu_kernel().integer_isa, fidelity,
                                       len(exact_tokens), first, chunk))
    return results


def render_integer_fidelity(results: list[IntegerFidelity], *, as_json: bool = False) -> str:
    """One line per package and x width (the package, then `describe()`), or the results as JSON."""
    if as_json:
        return json.dumps([r.to_json() for r in results], indent=2) + "\n"
    return "\n".join(f"{r.package}: {r.describe()}" for r in results)
