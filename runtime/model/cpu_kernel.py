"""layerline's CPU kernel for packed weights, and moving a loaded model's packed layers onto it.

mlx's CPU `quantized_matmul` reads packed weights at about 1.2 GB/s and costs about
rows x one row. The kernel in `native/` (an mlx primitive built by `pip install`;
AVX-512, AVX2, NEON on arm64, or portable code chosen at run time) reads each packed
weight once per call, whatever the number of rows, at memory speed. After a range or the head is
loaded on the CPU, `use_cpu_kernel` swaps mlx-lm's `QuantizedLinear` layers (and a
tied head's `as_linear`) onto it; Metal and CUDA keep mlx's kernels. The embedding
lookup stays mlx's: it dequantizes only the rows of the tokens asked for.

Without a compiler at install time the kernel is absent: layerline then runs mlx's
kernels and says so once in the log, in `layerline run`'s first line and in `/v1/status`.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger("layerline.runtime")

ENV_VAR = "LAYERLINE_CPU_KERNEL"  # "off" runs mlx's kernels even where the kernel is built
ISA_ENV_VAR = "LAYERLINE_KERNEL_ISA"  # portable | avx2 | avx512 | neon: force one path (read by the kernel)
THREADS_ENV_VAR = "LAYERLINE_KERNEL_THREADS"  # threads per product (default: the CPUs this process may use)
BUILD_ERROR_FILE = Path(__file__).with_name("_cpu_kernel.build-error.txt")  # written by setup.py
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUPS = (32, 64, 128)
_BUILD_HINT = ("install a C++ compiler and cmake (apt-get install build-essential cmake), then "
               "reinstall layerline (pip install -e .)")


@dataclass(frozen=True)
class CpuKernel:
    available: bool
    isa: str  # "avx512", "avx2", "neon", "portable", or "none"
    threads: int
    reason: str

    def describe(self) -> str:
        """One log-line fragment: `cpu_kernel=avx512 threads=2` or why mlx's kernels run instead."""
        if self.available:
            return f"cpu_kernel={self.isa} threads={self.threads}"
        return f"cpu_kernel=none ({self.reason})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _native() -> ModuleType:
    from . import _cpu_kernel  # type: ignore[attr-defined]

    return _cpu_kernel


def _probe() -> CpuKernel:
    setting = os.environ.get(ENV_VAR, "").strip().lower()
    if setting in ("off", "0", "no", "none"):
        return CpuKernel(False, "none", 0, f"{ENV_VAR}={setting} asks for mlx's kernels")
    try:
        native = _native()
    except ImportError as exc:
        built = BUILD_ERROR_FILE.read_text(encoding="utf-8").strip() if BUILD_ERROR_FILE.exists() else None
        why = f"not built: {built}" if built else f"not importable: {exc}"
        return CpuKernel(False, "none", 0, f"{why}; mlx's kernels run instead; {_BUILD_HINT}")
    runtime_mlx = mx.__version__.split(".dev")[0]
    if native.built_for_mlx != runtime_mlx:
        return CpuKernel(False, "none", 0,
                         f"built for mlx {native.built_for_mlx}, this is mlx {runtime_mlx}; mlx's kernels "
                         "run instead; reinstall layerline (pip install -e .) to rebuild it")
    return CpuKernel(True, native.isa(), native.threads(), "built")


@functools.cache  # a fact of the process: probed, and a missing kernel logged, once
def cpu_kernel() -> CpuKernel:
    """Whether layerline's packed-weight kernel is usable in this process, and which path it runs."""
    kernel = _probe()
    if not kernel.available:
        log.warning("event=cpu_kernel_missing %s", kernel.describe())
    return kernel


def packed_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int,
                  bits: int, name: str = "weight") -> mx.array:
    """x @ dequantize(w, scales, biases).T on the CPU; a bad shape raises ValueError naming `name`."""
    return _native().packed_matmul(x, w, scales, biases, group_size, bits, name)


def supports(layer: nn.Module) -> bool:
    """Whether the kernel computes this packed layer (affine mode, bits and group it holds)."""
    return (getattr(layer, "mode", "affine") == "affine" and "biases" in layer
            and layer.bits in SUPPORTED_BITS and layer.group_size in SUPPORTED_GROUPS)


class KernelQuantizedLinear(nn.QuantizedLinear):
    """mlx's QuantizedLinear, computed by layerline's CPU kernel (same parameters, same names)."""

    kernel_name = "weight"

    def __call__(self, x: mx.array) -> mx.array:
        y = packed_matmul(x, self["weight"], self["scales"], self["biases"], group_size=self.group_size,
                          bits=self.bits, name=self.kernel_name)
        return y + self["bias"] if "bias" in self else y


class KernelQuantizedEmbedding(nn.QuantizedEmbedding):
    """mlx's QuantizedEmbedding whose tied-head product (`as_linear`) runs on the CPU kernel."""

    kernel_name = "embed_tokens"

    def __call__(self, x: mx.array) -> mx.array:
        # Only the looked-up rows are dequantized; their f16 scales are widened first, so the
        # embedding is exact in f32 (mlx would return the scales' f16).
        return mx.dequantize(self["weight"][x], self["scales"][x].astype(mx.float32),
                             self["biases"][x].astype(mx.float32), group_size=self.group_size,
                             bits=self.bits, mode=self.mode)

    def as_linear(self, x: mx.array) -> mx.array:
        return packed_matmul(x, self["weight"], self["scales"], self["biases"], group_size=self.group_size,
                             bits=self.bits, name=self.kernel_name)


def use_cpu_kernel(module: nn.Module) -> int:
    """Move `module`'s packed layers onto the CPU kernel when mlx computes on the CPU; how many moved."""
    if mx.default_device() != mx.cpu or not cpu_kernel().available:
        return 0
    moved = 0
    for path, layer in module.named_modules():
        kind = {nn.QuantizedLinear: KernelQuantizedLinear,
                nn.QuantizedEmbedding: KernelQuantizedEmbedding}.get(type(layer))
        if kind is not None and supports(layer):
            layer.__class__ = kind  # same parameters, another product
            layer.kernel_name = path or kind.kernel_name
            _narrow_scales(layer)
            moved += 1
    if moved:
        mx.clear_cache()  # the f32 scales just replaced would otherwise stay resident in mlx's cache
    return moved


def _narrow_scales(layer: nn.Module) -> None:
    """Keep scales and biases in f16 where that holds them exactly (as packages store them).

    The kernel reads f16 directly; f32 copies would add a quarter to a 4-bit/32 weight's bytes.
    """
    scales, biases = layer["scales"], layer["biases"]
    if scales.dtype != mx.float32:
        return
    narrow = scales.astype(mx.float16), biases.astype(mx.float16)
    wide = (scales, biases)
    if all(mx.array_equal(n.astype(mx.float32), w).item() for n, w in zip(narrow, wide, strict=True)):
        layer["scales"], layer["biases"] = narrow
