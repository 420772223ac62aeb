"""layerline's CPU kernel for packed weights, and moving a loaded model's packed layers onto it.

mlx's CPU `quantized_matmul` reads packed weights at about 1.2 GB/s and costs about
rows x one row. The kernel in `native/` (an mlx primitive built by `pip install`;
AVX-512, AVX2, NEON on arm64, or portable code chosen at run time) reads each packed
weight once per call, whatever the number of rows, at memory speed. After a range or the head is
loaded on the CPU, `use_cpu_kernel` swaps mlx-lm's `QuantizedLinear` layers (and a
tied head's `as_linear`) onto it; Metal and CUDA keep mlx's kernels. The embedding
lookup stays mlx's: it dequantizes only the rows of the tokens asked for.

One-row products of 4-, 5- and 8-bit weights (a decode step) can instead quantize x per block
of 32 to integers and multiply in integers, as llama.cpp does (`LAYERLINE_CPU_INTEGER_X`):
`off` keeps the exact f32 x; `int8` is llama.cpp's int8 x (maddubs, VNNI, sdot); `int16` rounds x
to 1/65534 of its block's largest value (below the f16 scales' own rounding) at about int8's
cost (pmaddwd, VNNI); `auto`, the default, times f32 x against int16 x at load (on weights read
from memory) and keeps the faster.

Products of 8 or more rows of 4-bit weights (a prompt's chunk, a batch pass of 8 sessions) can run
in integers too where the CPU has AVX-512 VNNI (`LAYERLINE_CPU_INTEGER_ROWS=on`): x to 14 bits
per span of 512 values, each weight row's group scales as 10-bit integer sub-scales of its span's
largest (as llama.cpp's Q4_K keeps them), 32 multiply-adds an instruction where f32 does 16:
prefill about 1.4x faster. Off by default: a row's result then depends on how many rows its pass
had, and a batched greedy answer was seen to differ from its solo one. The error against f32 x on
a real package, of one-row steps and of a whole chunk, is measured by `layerline bench kernels --package`.

Without a compiler at install time the kernel is absent: layerline then runs mlx's
kernels and says so once in the log, in `layerline run`'s first line and in `/v1/status`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator
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
INTEGER_ENV_VAR = "LAYERLINE_CPU_INTEGER_X"  # off | int8 | int16 | auto: x of one-row 4/5/8-bit products
INTEGER_SETTINGS = ("off", "int8", "int16", "auto")
INTEGER_BITS = (4, 5, 8)  # the weight widths the integer path computes (one row of x)
# int16 x where it is faster: it changed no greedy token in 64 on SmolLM2, Qwen2.5 0.5B and 1.5B
# (mean KL against f32 x 8e-8, 1e-8, 6e-8). int8 x, 4e-3 on Qwen 1.5B and SmolLM2's tokens changed
# from the 5th, is only ever asked for.
INTEGER_DEFAULT = "auto"
ROWS_ENV_VAR = "LAYERLINE_CPU_INTEGER_ROWS"  # off | on: 8+ rows of 4-bit weights in integers
ROWS_SETTINGS = ("off", "on")
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
    gemv_x: str = "f32"  # x of one-row products: "f32", or "int8"/"int16" on the integer path
    integer_isa: str = "none"  # the integer path's instruction set ("avx512-vnni", "avx2", ...)
    gemv_x_reason: str = ""  # why: the setting, and for `auto` the times it chose by
    rows_x: str = "f32"  # x of products of 8 or more rows of 4-bit weights: "f32" or "int14"
    rows_isa: str = "none"  # the instruction set of the integer path for many rows, where there is one
    rows_reason: str = ""  # why: the setting, and where it was asked for but this CPU has no path

    def describe(self) -> str:
        """A log-line fragment: `cpu_kernel=avx512 threads=2 gemv_x=f32 rows_x=f32` or why mlx's
        kernels run instead."""
        if self.available:
            x = self.gemv_x if self.gemv_x == "f32" else f"{self.gemv_x}({self.integer_isa})"
            rows = self.rows_x if self.rows_x == "f32" else f"{self.rows_x}({self.rows_isa})"
            return f"cpu_kernel={self.isa} threads={self.threads} gemv_x={x} rows_x={rows}"
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
    x_bits, reason = _choose_gemv_x(native)
    native.set_gemv_x(x_bits or 0)
    x = "f32" if x_bits is None else f"int{x_bits}"
    rows_isa = native.integer_rows_isa()
    rows_on, rows_reason = _choose_rows(rows_isa)
    native.set_integer_rows(rows_on)
    return CpuKernel(True, native.isa(), native.threads(), "built", x, native.integer_isa(), reason,
                     "int14" if rows_on else "f32", rows_isa, rows_reason)


@functools.cache  # a fact of the process: probed, and a missing kernel logged, once
def cpu_kernel() -> CpuKernel:
    """Whether layerline's packed-weight kernel is usable in this process, and which path it runs."""
    kernel = _probe()
    if not kernel.available:
        log.warning("event=cpu_kernel_missing %s", kernel.describe())
    return kernel


def integer_setting() -> str:
    """LAYERLINE_CPU_INTEGER_X as given (off, int8, int16 or auto); anything else is refused."""
    setting = os.environ.get(INTEGER_ENV_VAR, "").strip().lower() or INTEGER_DEFAULT
    if setting not in INTEGER_SETTINGS:
        raise ValueError(f"{INTEGER_ENV_VAR}={setting!r}: expected one of {', '.join(INTEGER_SETTINGS)}")
    return setting


def rows_setting() -> str:
    """LAYERLINE_CPU_INTEGER_ROWS as given (off or on; off when unset); anything else is refused."""
    setting = os.environ.get(ROWS_ENV_VAR, "").strip().lower() or "off"
    if setting not in ROWS_SETTINGS:
        raise ValueError(f"{ROWS_ENV_VAR}={setting!r}: expected one of {', '.join(ROWS_SETTINGS)}")
    return setting


def _choose_rows(rows_isa: str) -> tuple[bool, str]:
    """Whether 8 or more rows of 4-bit weights take the integer path here, and why."""
    setting = rows_setting()
    if setting == "on" and rows_isa == "none":
        return False, f"{ROWS_ENV_VAR}=on, but this CPU has no AVX-512 VNNI: f32 x"
    return setting == "on", f"{ROWS_ENV_VAR}={setting}"


def _choose_gemv_x(native: ModuleType) -> tuple[int | None, str]:
    """x's integer width on one-row products here (None: f32 x), and why."""
    setting = integer_setting()
    if setting != "auto":
        return {"off": None, "int8": 8, "int16": 16}[setting], f"{INTEGER_ENV_VAR}={setting}"
    f32_ms, int16_ms = calibrate_integer(native)
    faster = int16_ms < 0.95 * f32_ms
    return 16 if faster else None, f"auto: int16 x {int16_ms:.3f} ms, f32 x {f32_ms:.3f} ms a 4-bit GEMV"


def calibrate_integer(native: ModuleType, n: int = 8192, k: int = 1536, copies: int = 8,
                      rounds: int = 3) -> tuple[float, float]:
    """Best milliseconds of a one-row 4-bit (n, k) product with f32 x, then with int16 x (in turns).

    The weight comes from memory, as a decode step's do: each call reads another of `copies`
    (8 of 8192 x 1536: 57 MB, past a server's last-level cache). In cache the f32 path is nearly
    as fast, and timing it there chose f32 x on a machine where int16 x decodes 1.6x faster.
    """
    weights = [(mx.full((n, k // 8), 0x5A3C96E1 + i, dtype=mx.uint32),
                mx.full((n, k // 32), 0.01, dtype=mx.float16), mx.full((n, k // 32), -0.08, dtype=mx.float16))
               for i in range(copies)]
    x = mx.random.normal((1, k), key=mx.random.key(1))
    mx.eval(weights, x)
    best = {False: float("inf"), True: float("inf")}
    try:
        for _ in range(rounds):
            for on in best:
                native.set_gemv_x(16 if on else 0)  # read when the product is evaluated: each is, here
                for w, scales, biases in weights:
                    started = time.perf_counter()
                    mx.eval(native.packed_matmul(x, w, scales, biases, 32, 4, "calibration"))
                    best[on] = min(best[on], time.perf_counter() - started)
    finally:
        native.set_gemv_x(0)
    del weights
    mx.clear_cache()  # the 57 MB of weights go back now, not when the cache next fills
    return best[False] * 1e3, best[True] * 1e3


@contextlib.contextmanager
def gemv_x(x_bits: int | None) -> Iterator[None]:
    """One-row products evaluated inside take x as int8 or int16 (None: f32); then the process's choice.

    Read when a product is evaluated, not when its graph is built: evaluate inside.
    """
    cpu_kernel()  # probed first: the probe sets the process's choice
    native = _native()
    before = native.gemv_x()
    native.set_gemv_x(x_bits or 0)
    try:
        yield
    finally:
        native.set_gemv_x(before)


@contextlib.contextmanager
def integer_rows(on: bool) -> Iterator[None]:
    """Products of 8 or more rows of 4-bit weights evaluated inside take the integer path for many
    rows (where the CPU has one) or not; then the process's choice. Read at evaluation: evaluate inside."""
    cpu_kernel()
    native = _native()
    before = native.integer_rows()
    native.set_integer_rows(on)
    try:
        yield
    finally:
        native.set_integer_rows(before)


def packed_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int,
                  bits: int, name: str = "weight") -> mx.array:
    """x @ dequantize(w, scales, biases).T on the CPU; a bad shape raises ValueError naming `name`."""
    cpu_kernel()  # probed once: that applies LAYERLINE_CPU_INTEGER_X
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
