"""`layerline bench kernels`: the packed-weight product on this CPU, against the memory and mlx.

One weight shape (default 8960x1536, Qwen2.5-1.5B's MLP) of random packed values is
multiplied by 1 (a GEMV, one decode step) and by 8, 16 and 32 rows (verifying a draft
window, or a prefill chunk) with layerline's CPU kernel, with mlx's `quantized_matmul`,
and with the f32 weights through the BLAS. Every call reads a different copy of the
weights, enough copies to outgrow the CPU's caches, so a GEMV is measured from memory
as a decode step reads it. The machine's read bandwidth is measured in the same run:
numpy sums of a large array on one thread and on every thread (numpy releases the
GIL), and the larger is the reference. The kernel's one-row product is timed with f32 x and,
for 4-, 5- and 8-bit weights, with x quantized to int8 and to int16 (the integer path), in
turns; `--package` also measures the integer path's error on a real model (`integer_fidelity`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from layerline.atomic_write import write_atomic

from ..model.blas import load_fast_blas
from ..model.cpu_kernel import INTEGER_BITS, cpu_kernel, gemv_x, packed_matmul
from .report import machine, png_bytes

DEFAULT_ROWS = (1, 8, 16, 32)
INTEGER_ROUNDS = 3  # rounds of f32, int8 and int16 x in turns, for one row
WORKING_SET_BYTES = 384 << 20  # packed weights cycled through: well past any CPU cache
BANDWIDTH_BYTES = 512 << 20  # the array the read bandwidth is measured on


@dataclass(frozen=True)
class KernelRow:
    rows: int
    layerline_ms: float | None
    mlx_ms: float
    f32_ms: float
    packed_bytes: int
    int8_ms: float | None = None  # the kernel with int8 x, where it applies (one row of 4/5/8 bits)
    int16_ms: float | None = None  # the kernel with int16 x, likewise

    @property
    def gbps(self) -> float | None:
        """Packed bytes (weights, scales, biases) read per second by layerline's kernel, in GB/s."""
        return self.packed_bytes / self.layerline_ms / 1e6 if self.layerline_ms else None


@dataclass(frozen=True)
class KernelBench:
    n: int
    k: int
    bits: int
    group_size: int
    threads: int
    read_gbps: float  # the machine's read bandwidth, as measured here
    read_gbps_one_thread: float
    kernel: str  # cpu_kernel().describe()
    blas: str
    rows: list[KernelRow]
    integer_isa: str = "none"  # the integer path's instruction set

    def row(self, rows: int) -> KernelRow | None:
        return next((r for r in self.rows if r.rows == rows), None)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [{**asdict(r), "gbps": r.gbps} for r in self.rows]}


def read_bandwidth(nbytes: int = BANDWIDTH_BYTES, threads: int = 1, repeats: int = 5) -> float:
    """GB/s of the best of `repeats` numpy sums of a float32 array of `nbytes`, split over `threads`."""
    data = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):  # the first pass faults the pages in
            started = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - started)
    return data.nbytes / best / 1e9


def _median_ms(call: Callable[[int], mx.array], copies: int, calls: int) -> float:
    """Median milliseconds of `calls` evaluated calls, each on the next copy (after one warm-up)."""
    mx.eval(call(0))
    times = []
    for i in range(calls):
        started = time.perf_counter()
        mx.eval(call((i + 1) % copies))
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e3


def bench_kernels(n: int = 8960, k: int = 1536, *, bits: int = 4, group_size: int = 64,
                  rows: Sequence[int] = DEFAULT_ROWS, calls: int = 40, mlx_calls: int = 5,
                  working_set_bytes: int = WORKING_SET_BYTES) -> KernelBench:
    """Time layerline's kernel, mlx's kernel and the f32 BLAS product for each row count."""
    kernel = cpu_kernel()
    threads = kernel.threads or os.cpu_count() or 1
    single = read_bandwidth()  # first, before the weights take memory
    many = read_bandwidth(threads=threads) if threads > 1 else single
    mx.random.seed(0)
    groups = k // group_size
    one = n * k * bits // 8 + 2 * n * groups * 2  # packed weight + f16 scales and biases, as packages hold
    copies = max(2, working_set_bytes // one)
    weights = [(mx.random.randint(0, 2**31 - 1, (n, k * bits // 32)).astype(mx.uint32),
                mx.random.uniform(0.001, 0.01, (n, groups)).astype(mx.float16),
                mx.random.uniform(-0.05, 0.05, (n, groups)).astype(mx.float16))
               for _ in range(copies)]
    # mlx's kernel gets f32 scales, as layerline gives it on CPU (f16 ones with f32 x are slower).
    wide = [(s.astype(mx.float32), b.astype(mx.float32)) for _, s, b in weights]
    mx.eval(weights, wide)
    # f32 weights are 8x larger at 4 bits: fewer copies cover the same bytes.
    dense = [mx.dequantize(weights[i][0], *wide[i], group_size=group_size, bits=bits)
             for i in range(max(2, copies * bits // 32))]
    mx.eval(dense)
    results = []
    for m in rows:
        x = mx.random.normal((m, k))
        mx.eval(x)

        def ours(i: int, x: mx.array = x) -> mx.array:
            w, s, b = weights[i]
            return packed_matmul(x, w, s, b, group_size=group_size, bits=bits, name="bench")

        def theirs(i: int, x: mx.array = x) -> mx.array:
            w, (s, b) = weights[i][0], wide[i]
            return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group_size, bits=bits)

        def f32(i: int, x: mx.array = x) -> mx.array:
            return x @ dense[i % len(dense)].T

        timed: dict[int | None, float] = {}
        if kernel.available:
            # One row: f32, int8 and int16 x in turns, three rounds, the best median of each kept
            # (on a shared machine a load spike then hits one round, not one width).
            widths = (None, 8, 16) if m == 1 and bits in INTEGER_BITS else (None,)
            for _ in range(INTEGER_ROUNDS if len(widths) > 1 else 1):
                for x_bits in widths:
                    with gemv_x(x_bits):
                        ms = _median_ms(ours, copies, calls)
                    timed[x_bits] = min(timed.get(x_bits, ms), ms)
        results.append(KernelRow(
            rows=m,
            layerline_ms=timed.get(None),
            mlx_ms=_median_ms(theirs, copies, mlx_calls),
            f32_ms=_median_ms(f32, len(dense), calls),
            packed_bytes=one,
            int8_ms=timed.get(8),
            int16_ms=timed.get(16),
        ))
    return KernelBench(n, k, bits, group_size, threads, max(single, many), single, kernel.describe(),
                       load_fast_blas().describe(), results, kernel.integer_isa)


COLUMNS = ("rows", "layerline ms", "GB/s (packed)", "of read bandwidth", "× one row", "mlx ms",
           "× mlx's kernel", "f32 BLAS ms", "int8-x ms", "int16-x ms")


def render_kernels(bench: KernelBench) -> str:
    """The table (Markdown), then the goals it is read against."""
    one = bench.row(1)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in bench.rows:
        ours = r.layerline_ms
        cells = (
            str(r.rows),
            "—" if ours is None else f"{ours:.2f}",
            "—" if r.gbps is None else f"{r.gbps:.1f}",
            "—" if r.gbps is None else f"{r.gbps / bench.read_gbps:.0%}",
            "—" if ours is None or one is None or not one.layerline_ms else f"{ours / one.layerline_ms:.2f}×",
            f"{r.mlx_ms:.2f}",
            "—" if ours is None else f"{r.mlx_ms / ours:.1f}×",
            f"{r.f32_ms:.2f}",
            "—" if r.int8_ms is None else f"{r.int8_ms:.2f}",
            "—" if r.int16_ms is None else f"{r.int16_ms:.2f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    head = (f"packed product {bench.n}x{bench.k}, {bench.bits}-bit, group {bench.group_size}, "
            f"{bench.threads} threads; read bandwidth {bench.read_gbps:.1f} GB/s "
            f"(one thread {bench.read_gbps_one_thread:.1f})")
    return "\n".join([head, "", *lines, "", *goal_lines(bench), "", bench.kernel, bench.blas])


def goal_lines(bench: KernelBench) -> list[str]:
    """The issue's goals, met or not, from this run's own ratios."""
    one, eight = bench.row(1), bench.row(8)
    if one is None or one.layerline_ms is None or one.gbps is None:
        return ["goals: no kernel, or no 1-row product measured"]
    lines = [f"- GEMV at {one.gbps / bench.read_gbps:.0%} of the read bandwidth (goal ≥ 70 %)",
             f"- GEMV {one.mlx_ms / one.layerline_ms:.1f}× mlx's kernel (goal ≥ 10×)"]
    if eight is not None and eight.layerline_ms:
        lines.append(f"- 8 rows cost {eight.layerline_ms / one.layerline_ms:.2f}× one row (goal ≤ 1.5×)")
    for name, ms in (("int8", one.int8_ms), ("int16", one.int16_ms)):
        if ms:
            lines.append(f"- GEMV with {name} x ({bench.integer_isa}): {one.layerline_ms / ms:.2f}× the "
                         f"speed of f32 x, {one.packed_bytes / ms / 1e6:.1f} GB/s")
    return lines


def write_kernel_report(output: Path, bench: KernelBench, command: Sequence[str]) -> str:
    """table.md, results.json and chart.png into `output`; returns the Markdown."""
    output.mkdir(parents=True, exist_ok=True)
    markdown = render_kernels(bench)
    write_atomic(output / "table.md", markdown + "\n")
    body = {"command": list(command), "machine": machine(), "load_average": os.getloadavg(),
            **bench.to_json()}
    write_atomic(output / "results.json", json.dumps(body, indent=2) + "\n")
    write_kernel_chart(output / "chart.png", bench)
    return markdown


def write_kernel_chart(path: Path, bench: KernelBench) -> None:
    """Milliseconds per product by rows (log scale): layerline's kernel (f32, int8, int16 x), mlx's, BLAS."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [r.rows for r in bench.rows]
    if all(r.layerline_ms for r in bench.rows):
        ax.plot(rows, [r.layerline_ms for r in bench.rows], "o-", label="layerline kernel")
    integer_times = (("int8", "D", "tab:red", [(r.rows, r.int8_ms) for r in bench.rows]),
                     ("int16", "v", "tab:purple", [(r.rows, r.int16_ms) for r in bench.rows]))
    for name, marker, color, times in integer_times:
        integer = [(rows, ms) for rows, ms in times if ms]
        if integer:
            ax.plot(*zip(*integer, strict=True), marker, color=color, label=f"layerline kernel, {name} x")
    ax.plot(rows, [r.mlx_ms for r in bench.rows], "s-", color="tab:gray", label="mlx quantized_matmul")
    ax.plot(rows, [r.f32_ms for r in bench.rows], "^-", color="tab:green", label="f32 weights (BLAS)")
    one = bench.row(1)
    if one is not None:
        floor = one.packed_bytes / bench.read_gbps / 1e6
        ax.axhline(floor, linestyle=":", color="black", label=f"packed bytes at {bench.read_gbps:.0f} GB/s")
    ax.set_yscale("log")
    ax.set_xlabel("rows of x")
    ax.set_ylabel("ms per product")
    ax.set_xticks(rows)
    ax.legend(fontsize=8)
    ax.set_title(f"{bench.n}x{bench.k} {bench.bits}-bit/{bench.group_size}, {bench.threads} threads",
                 fontsize=10)
    fig.tight_layout()
    write_atomic(path, png_bytes(fig))
    plt.close(fig)
