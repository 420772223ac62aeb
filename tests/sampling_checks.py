"""Tiny models with peaked distributions, their exact sampling distributions and a chi-square
test: what the sampled-speculation tests of the decode loop and the scheduler share."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

from layerline.packager.build import BuildOptions, build_package
from layerline.runtime.bench.tiny_model import random_llama_weights, write_hf_folder
from layerline.runtime.decode.local_pipeline import LocalPipeline
from layerline.runtime.decode.sampling import SamplingParams
from layerline.runtime.decode.targets import PREFILL_STEP
from layerline.runtime.stage0.scheduler import BatchScheduler

from helpers import TINY_LLAMA_CONFIG

TINY_VOCAB = 32


def tiny_pipeline(root: Path, tokenizer_dir: Path, seed: int, vocab: int = TINY_VOCAB,
                  head_scale: float = 6.0, noise: float = 0.0) -> LocalPipeline:
    """A 2-layer random llama with a small vocabulary and a peaked output distribution;
    `noise` perturbs every weight (a draft close to the model of the same seed)."""
    config = {**TINY_LLAMA_CONFIG, "vocab_size": vocab, "num_hidden_layers": 2}
    weights = random_llama_weights(config, seed)
    weights["lm_head.weight"] = weights["lm_head.weight"] * head_scale
    rng = np.random.default_rng(1000 + seed)
    weights = {k: (v * (1 + noise * rng.standard_normal(v.shape))).astype(np.float32)
                for k, v in weights.items()}
    name = f"{seed}-{vocab}-{noise}"
    folder = write_hf_folder(root / f"hf-{name}", config, weights, tokenizer_dir)
    out = root / f"package-{name}"
    build_package(str(folder), out, BuildOptions(quantize="f32", quiet=True))
    return LocalPipeline.load(out, weights="f32", tokenizer=False)


def reference_probs(logits: np.ndarray, history: list[int], params: SamplingParams) -> np.ndarray:
    """The request's sampling distribution over one row, written out from the definitions."""
    x = logits.astype(np.float64).copy()
    if params.repetition_penalty != 1.0:
        for t in set(history[-params.repetition_context:]):
            x[t] = x[t] * params.repetition_penalty if x[t] < 0 else x[t] / params.repetition_penalty
    if params.top_k:
        x[np.argsort(-x)[params.top_k:]] = -np.inf
    if params.top_p < 1.0:
        order = np.argsort(-x)
        probs = np.exp(x[order] - x[order][0])
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        x[order[before >= params.top_p]] = -np.inf
    if params.min_p > 0.0:
        x[x < x.max() + math.log(params.min_p)] = -np.inf
    z = x / params.temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def exact_joint(model: LocalPipeline, prompt: list[int], params: SamplingParams) -> np.ndarray:
    """P(t1, t2, t3) of plain sampling from `model`, shape (V, V, V)."""
    vocab = TINY_VOCAB
    pairs = [(a, b) for a in range(vocab) for b in range(vocab)]
    batch = mx.array([prompt + [a, b] for a, b in pairs])
    logits = np.array(model(batch, model.make_cache()).astype(mx.float32))
    n = len(prompt)
    joint = np.zeros((vocab, vocab, vocab))
    p1 = reference_probs(logits[0, n - 1], prompt, params)
    for row, (a, b) in enumerate(pairs):
        p2 = reference_probs(logits[row, n], prompt + [a], params)
        p3 = reference_probs(logits[row, n + 1], prompt + [a, b], params)
        joint[a, b] = p1[a] * p2[b] * p3
    return joint


def chi_square_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, stat/2)."""
    a, x = df / 2, stat / 2
    if x <= 0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:  # series for P, then Q = 1 - P
        term = total = 1 / a
        k = a
        while term > total * 1e-15:
            k += 1
            term *= x / k
            total += term
        return max(0.0, 1 - total * math.exp(log_front))
    b, c, d = x + 1 - a, 1e300, 1 / (x + 1 - a)  # continued fraction for Q (Lentz)
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_front) * h


def chi_square_p(counts: Counter, probs: np.ndarray, n: int) -> tuple[float, int]:
    """p-value and degrees of freedom of observed `counts` of cells against `probs`.

    Cells expected fewer than 5 times are pooled into one bin, as the test requires."""
    expected = probs.ravel() * n
    observed = np.zeros_like(expected)
    for cell, count in counts.items():
        observed[np.ravel_multi_index(cell, probs.shape)] = count
    big = expected >= 5
    e = [*expected[big], expected[~big].sum()]
    o = [*observed[big], observed[~big].sum()]
    if e[-1] < 5:  # too little pooled mass for a bin of its own: join the smallest kept cell
        smallest = int(np.argmin(e[:-1]))
        e[smallest] += e.pop()
        o[smallest] += o.pop()
    stat = sum((oi - ei) ** 2 / ei for oi, ei in zip(o, e, strict=True))
    return chi_square_sf(stat, len(e) - 1), len(e) - 1


SAMPLES = 1200
SIGNIFICANCE = 1e-3




def one_stage_scheduler(model: LocalPipeline) -> BatchScheduler:
    """Stage 0's scheduler over the model's one range, in this process (no peers)."""
    (layers,) = model.ranges
    return BatchScheduler.local(model.head, layers, context_length=512, compute_dtype=mx.float32,
                                max_sessions=64, max_rows=PREFILL_STEP)
