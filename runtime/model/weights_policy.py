"""The weight format a device runs a package in: packed as stored, or expanded to floats.

Measured on a 2-core x86-64 Linux box (AMD EPYC with AVX-512, mlx 0.32 CPU,
OpenBLAS, shared with other work; `layerline bench kernels`): a 4-bit
8960x1536 product of one row takes 0.30-0.49 ms with layerline's CPU kernel
(65-112 % of the read bandwidth a numpy sum measures), 6-10 ms with the f32
weights through OpenBLAS and 9-24 ms with mlx's quantized kernel. Whole
Qwen2.5-Coder-1.5B decodes packed weights on the kernel 4-6x faster than f32
ones (14.4 tok/s against 3.3), in under a quarter of the memory. So on Linux CPU `auto` keeps
packed weights when the kernel is built; without it mlx's packed kernels are
slower than f32 through a fast BLAS, so `auto` expands to f32 when one is
loaded and the expanded range fits in memory. Activations are f32 on CPU
whatever the weights (f16/bf16 arithmetic there is many times slower). On
Metal and CUDA, packed weights with mlx's kernels are the fast path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from layerline.errors import LayerlineError
from layerline.packager.manifest import Manifest

from .blas import load_fast_blas
from .cpu_kernel import cpu_kernel
from .host_memory import host_memory

WEIGHT_CHOICES = ("auto", "packed", "f32", "bf16", "f16")
_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Expanded weights may take at most this share of available memory, leaving room
# for the KV cache, activations and other stages on the same machine.
MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "metal" | "cuda"
    fast_blas: bool
    memory_available: int  # bytes
    cpu_kernel: str | None = None  # the packed-weight kernel's path ("avx512", …) on CPU, if built

    def describe(self) -> str:
        gib = self.memory_available / (1 << 30)
        return f"device={self.kind} memory_available={gib:.1f}GiB"


@dataclass(frozen=True)
class WeightsPlan:
    format: str  # "packed" (quantized, as stored), or the float format: "f32", "bf16", "f16"
    compute_dtype: str  # mlx dtype of activations and of every unquantized tensor
    reason: str

    @property
    def expands(self) -> bool:
        """Whether packed weights are dequantized to floats."""
        return self.format != "packed"

    def describe(self) -> str:
        """One log-line fragment: `weights=f32 compute=float32 (why)`."""
        return f"weights={self.format} compute={self.compute_dtype} ({self.reason})"


def device_kind() -> str:
    """What mlx computes on here: cpu, metal or cuda."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        return "metal" if sys.platform == "darwin" else "cuda"
    return "cpu"


def detect_device() -> Device:
    """The device mlx computes on here, whether a fast BLAS is loaded, and free memory."""
    kind = device_kind()
    kernel = cpu_kernel() if kind == "cpu" else None
    return Device(kind=kind, fast_blas=load_fast_blas().fast, memory_available=host_memory().available,
                  cpu_kernel=kernel.isa if kernel is not None and kernel.available else None)


def expanded_bytes(manifest: Manifest, files: list[str], dtype: str = "float32") -> int:
    """About how many bytes `files` take once every weight is expanded to `dtype`."""
    stored = sum(manifest.file(f).bytes for f in files)
    if manifest.quantization is not None:
        # Packed weights dominate the files; each b-bit value becomes one float.
        return stored * 8 * _DTYPE_BYTES[dtype] // manifest.quantization.bits
    return stored * _DTYPE_BYTES[dtype] // _DTYPE_BYTES.get(manifest.dtype, 4)


def plan_weights(requested: str, manifest: Manifest, files: list[str], device: Device) -> WeightsPlan:
    """Decide the weight format for loading `files` of a package on `device`."""
    return choose_weights(requested, quantized=manifest.quantization is not None, dtype=manifest.dtype,
                          expanded=lambda: expanded_bytes(manifest, files), device=device)


def choose_weights(requested: str, *, quantized: bool, dtype: str, expanded: Callable[[], int],
                   device: Device) -> WeightsPlan:
    """The weight format for layers stored packed (`quantized`) or as `dtype` on `device`;
    `expanded` tells how many bytes they would take as f32."""
    if requested not in WEIGHT_CHOICES:
        raise LayerlineError(
            f"unknown weight format {requested!r}",
            hint=f"use --weights with one of {', '.join(WEIGHT_CHOICES)}",
        )
    stored = "packed" if quantized else _short(dtype)
    if requested in _DTYPES:
        return WeightsPlan(requested, _DTYPES[requested], "asked for")
    on_cpu = device.kind == "cpu"
    # f16 and bf16 arithmetic on mlx's CPU backend is many times slower than f32, so packed
    # weights get f32 scales and activations there; unquantized weights keep their dtype.
    packed_compute = "float32" if on_cpu and quantized else dtype
    if requested == "packed":
        return WeightsPlan(stored, packed_compute, f"asked for packed; package stores {stored}")
    if not on_cpu:
        return WeightsPlan(stored, dtype, f"auto: {device.kind} runs stored weights fastest")
    if not quantized and dtype == "float32":
        return WeightsPlan("f32", "float32", "auto: package stores f32")
    if quantized and device.cpu_kernel:
        return WeightsPlan("packed", "float32",
                           f"auto: layerline's cpu kernel ({device.cpu_kernel}) reads packed weights fastest")
    if quantized and not device.fast_blas:
        return WeightsPlan(
            "packed", "float32",
            "auto: no cpu kernel and no fast BLAS loaded, so f32 weights would not be faster",
        )
    need = expanded()
    budget = int(device.memory_available * MEMORY_SHARE)
    if need > budget:
        return WeightsPlan(
            stored, packed_compute,
            f"auto: f32 weights would take {need >> 20} MiB, over {MEMORY_SHARE:.0%} of the "
            f"{device.memory_available >> 20} MiB available",
        )
    why = "without layerline's cpu kernel, " if quantized else ""
    return WeightsPlan("f32", "float32",
                       f"auto: {why}cpu with {load_fast_blas().name} BLAS decodes f32 fastest")


def _short(dtype: str) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, dtype)
