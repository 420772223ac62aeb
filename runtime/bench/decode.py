"""`layerline bench decode`: prefill and decode speed per weight format, beside bare mlx-lm.

For each format the package is loaded twice, one after the other: as a
layerline pipeline (the head + one range of every layer) driven by the decode loop
that serves (`decode.loop`, as `layerline run` uses it), and as a whole mlx-lm model
holding the very same converted tensors, driven by mlx-lm's own `generate_step`.
Both decode greedily from the same prompt for the same number of tokens, ignoring
end-of-sequence, and the best of `repeats` runs is kept.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from layerline.packager.architectures import build_model, whole_model_weights
from layerline.packager.package import LayerPackage

from ..decode.local_pipeline import LocalPipeline
from ..decode.loop import generate
from ..decode.sampling import SamplingParams
from ..decode.targets import LocalTarget
from ..model.package_tensors import apply_plan, load_into, read_verified
from ..model.weights_policy import WeightsPlan, detect_device, plan_weights
from .token_profile import fused_ops_switched

BENCH_FORMATS = ("packed", "f32", "bf16", "f16")
_FILLER = (
    "The history of computing is a story of layers: transistors make gates, gates make "
    "circuits, circuits make processors, and processors run programs that build more programs. "
)


@dataclass(frozen=True)
class DecodeBenchRow:
    weights: str
    compute_dtype: str
    layerline_prefill_tps: float
    layerline_decode_tps: float
    mlx_lm_prefill_tps: float
    mlx_lm_decode_tps: float
    resident_bytes: int = 0  # the process's resident memory after layerline's runs, less before loading
    files_bytes: int = 0  # the package files those weights were read from

    @property
    def decode_ratio(self) -> float:
        """layerline's decode speed as a share of bare mlx-lm's."""
        return self.layerline_decode_tps / self.mlx_lm_decode_tps if self.mlx_lm_decode_tps else 0.0


def bench_prompt(tokenizer: object, n_tokens: int) -> list[int]:
    """A prompt of exactly `n_tokens` tokens of plain English."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids = list(tokenizer.encode(_FILLER * (1 + n_tokens // 20), add_special_tokens=False))
    return ids[:n_tokens]


def load_bare_mlx_lm(package: LayerPackage, plan: WeightsPlan) -> nn.Module:
    """The whole model as plain mlx-lm builds it, holding the tensors layerline would load."""
    manifest = package.manifest
    model = build_model(manifest.config)
    weights: dict[str, mx.array] = {}
    for tensors in read_verified(package, [manifest.shared["embed"], manifest.shared["head"]]):
        weights.update(apply_plan(tensors, plan, manifest.quantization))
    layer_files = manifest.layer_files(0, manifest.num_layers)
    for index, tensors in enumerate(read_verified(package, layer_files)):
        prefix = f"model.layers.{index}."
        for name, value in apply_plan(tensors, plan, manifest.quantization, prefix).items():
            weights[prefix + name] = value
    weights = whole_model_weights(model, manifest.config, weights)
    # mlx's own kernels: this is the reference layerline is compared with.
    load_into(model, weights, manifest.quantization, cpu_kernel=False)
    return model


def _time_tokens(tokens: object, n_prompt: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of an iterator that yields one generated token at a time."""
    started = time.perf_counter()
    first = last = started
    count = 0
    for _ in tokens:
        count += 1
        last = time.perf_counter()
        if count == 1:
            first = last
    prefill = n_prompt / (first - started)
    decode = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    return prefill, decode


def _best(run: Callable[[], tuple[float, float]], repeats: int) -> tuple[float, float]:
    results = [run() for _ in range(repeats)]
    return max(r[0] for r in results), max(r[1] for r in results)


def resident_bytes() -> int:
    """This process's resident memory (VmRSS), or 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _bench_layerline(package_dir: str | Path, weights: str, prompt_tokens: int, decode_tokens: int,
                     repeats: int) -> tuple[WeightsPlan, list[int], tuple[float, float], int]:
    mx.clear_cache()
    before = resident_bytes()
    pipeline = LocalPipeline.load(package_dir, None, weights)
    prompt = bench_prompt(pipeline.tokenizer, prompt_tokens)

    def run(max_tokens: int = decode_tokens) -> tuple[float, float]:
        generation = generate(LocalTarget.open(pipeline), prompt, SamplingParams(max_tokens=max_tokens))
        return _time_tokens(generation, len(prompt))

    run(4)  # warm-up
    best = _best(run, repeats)
    return pipeline.plan, prompt, best, resident_bytes() - before


def _bench_mlx_lm(package_dir: str | Path, plan: WeightsPlan, prompt: list[int], decode_tokens: int,
                  repeats: int) -> tuple[float, float]:
    from mlx_lm.generate import generate_step

    model = load_bare_mlx_lm(LayerPackage.open(package_dir), plan)
    prompt_array = mx.array(prompt, dtype=mx.uint32)

    def run(max_tokens: int = decode_tokens) -> tuple[float, float]:
        steps = generate_step(prompt_array, model, max_tokens=max_tokens,
                              sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
        return _time_tokens(steps, len(prompt))

    run(4)  # warm-up
    return _best(run, repeats)


def bench_format(package_dir: str | Path, weights: str, *, prompt_tokens: int = 128,
                 decode_tokens: int = 64, repeats: int = 2, mlx_lm: bool = True) -> DecodeBenchRow:
    """Measure one weight format with layerline, then (unless not `mlx_lm`) with bare mlx-lm."""
    # One model in memory at a time: each helper's model is freed when it returns.
    plan, prompt, ours, resident = _bench_layerline(package_dir, weights, prompt_tokens, decode_tokens,
                                                    repeats)
    gc.collect()
    # mlx-lm's model module calls layerline's attention once a range is built: mlx's ops there too.
    with fused_ops_switched(False):
        bare = _bench_mlx_lm(package_dir, plan, prompt, decode_tokens, repeats) if mlx_lm else (0.0, 0.0)
    gc.collect()
    manifest = LayerPackage.open(package_dir).manifest
    files = sum(f.bytes for f in manifest.files if f.path.endswith(".safetensors"))
    return DecodeBenchRow(plan.format, plan.compute_dtype, ours[0], ours[1], bare[0], bare[1], resident,
                          files)


def bench_decode(package_dir: str | Path, formats: tuple[str, ...] = BENCH_FORMATS, *,
                 prompt_tokens: int = 128, decode_tokens: int = 64,
                 repeats: int = 2, mlx_lm: bool = True) -> list[DecodeBenchRow]:
    """One row per weight format: layerline's and bare mlx-lm's prefill and decode tok/s."""
    return [
        bench_format(package_dir, fmt, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                     repeats=repeats, mlx_lm=mlx_lm)
        for fmt in formats
    ]


COLUMNS = ("weights", "compute", "layerline prefill tok/s", "layerline decode tok/s",
           "mlx-lm prefill tok/s", "mlx-lm decode tok/s", "decode vs mlx-lm", "resident MiB", "× files")


def render_rows(rows: list[DecodeBenchRow]) -> str:
    """The rows as a Markdown table (readable in a terminal, pasteable into docs)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        bare = r.mlx_lm_decode_tps > 0  # 0: not measured (--no-mlx-lm)
        cells = (r.weights, r.compute_dtype, f"{r.layerline_prefill_tps:.1f}",
                 f"{r.layerline_decode_tps:.2f}", f"{r.mlx_lm_prefill_tps:.1f}" if bare else "—",
                 f"{r.mlx_lm_decode_tps:.2f}" if bare else "—", f"{r.decode_ratio:.1%}" if bare else "—",
                 f"{r.resident_bytes / (1 << 20):.0f}",
                 f"{r.resident_bytes / r.files_bytes:.2f}×" if r.files_bytes else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def auto_choice(package_dir: str | Path) -> WeightsPlan:
    """What `--weights auto` picks for the whole package on this machine."""
    package = LayerPackage.open(package_dir)
    m = package.manifest
    files = [*m.layer_files(0, m.num_layers), m.shared["embed"], m.shared["head"]]
    return plan_weights("auto", m, files, detect_device())
