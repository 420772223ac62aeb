"""layerline's CPU kernel for packed weights: against mlx's own kernel on every bits, group and
row count (each instruction-set path forced in turn), on SmolLM2's real layers, its errors, and
a package decoding on it exactly as it does in f32."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from layerline.packager.package import LayerPackage
from layerline.runtime.decode.local_pipeline import LocalPipeline
from layerline.runtime.decode.loop import generate
from layerline.runtime.decode.sampling import SamplingParams
from layerline.runtime.decode.targets import LocalTarget
from layerline.runtime.model.cpu_kernel import (
    KernelQuantizedEmbedding,
    KernelQuantizedLinear,
    cpu_kernel,
    packed_matmul,
)
from layerline.runtime.model.weights_policy import Device, plan_weights

from helpers import sweep_on_isa

pytestmark = pytest.mark.skipif(not cpu_kernel().available, reason=f"no CPU kernel: {cpu_kernel().reason}")

MAX_RELATIVE_ERROR = 1e-4

# Run in a fresh process per path: the kernel picks its instruction set once per process.
_SWEEP = r"""
import json, sys
import layerline
import mlx.core as mx
from layerline.runtime.model.cpu_kernel import cpu_kernel, packed_matmul

mx.random.seed(7)
worst = {}
for bits in (2, 3, 4, 5, 6, 8):
    for group in (32, 64, 128):
        N, K = 37, group * 5  # odd row count; widths of several groups
        q, s, b = mx.quantize(mx.random.normal((N, K)), group_size=group, bits=bits)
        x = mx.random.normal((32, K))
        for rows in range(1, 33):
            # Scales and biases as f32, and (for a few row counts) as stored in f16 or bf16.
            for dtype in (mx.float32, mx.float16, mx.bfloat16) if rows in (1, 5, 32) else (mx.float32,):
                s_, b_ = s.astype(dtype), b.astype(dtype)
                ref = mx.quantized_matmul(x[:rows], q, s_.astype(mx.float32), b_.astype(mx.float32),
                                          transpose=True, group_size=group, bits=bits)
                got = packed_matmul(x[:rows], q, s_, b_, group_size=group, bits=bits, name="random")
                err = (mx.abs(got - ref).max() / mx.abs(ref).max()).item()
                key = f"bits={bits} group={group}"
                worst[key] = max(worst.get(key, 0.0), err)
    # Taller and wider: each thread's rows span several of the kernel's L2 chunks, ending off a block.
    q, s, b = mx.quantize(mx.random.normal((413, 2048)), group_size=64, bits=bits)
    x = mx.random.normal((9, 2048))
    s16, b16 = s.astype(mx.float16), b.astype(mx.float16)
    for rows in (1, 5, 9):
        got = packed_matmul(x[:rows], q, s16, b16, group_size=64, bits=bits, name="tall")
        ref = mx.quantized_matmul(x[:rows], q, s16.astype(mx.float32), b16.astype(mx.float32), transpose=True,
                                  group_size=64, bits=bits)
        key = f"bits={bits} group=64"
        worst[key] = max(worst[key], (mx.abs(got - ref).max() / mx.abs(ref).max()).item())
print(json.dumps({"isa": cpu_kernel().isa, "worst": worst}))
"""


def relative_error(got: mx.array, ref: mx.array) -> float:
    return (mx.abs(got - ref).max() / mx.abs(ref).max()).item()


@pytest.mark.parametrize("isa", ["avx512", "avx2", "neon", "portable"])
def test_kernel_matches_mlx_for_every_bits_group_and_row_count_on_each_path(isa):
    report = sweep_on_isa(_SWEEP, isa)
    bad = {k: v for k, v in report["worst"].items() if v > MAX_RELATIVE_ERROR}
    assert not bad and len(report["worst"]) == 18


CHECK_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "check_cpu_kernel.sh"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["native", "arm64"])
def test_vector_paths_match_portable_path_without_mlx(target):
    """The kernel's own sources, built apart from mlx: natively (AVX2/AVX-512 here), and NEON
    cross-compiled for arm64 and run under qemu where the tools are installed."""
    cross = ["aarch64-linux-gnu-g++", "qemu-aarch64"]
    needed = cross if target == "arm64" else [os.environ.get("CXX", "c++")]
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not on PATH (apt-get install g++-aarch64-linux-gnu qemu-user)")
    result = subprocess.run(["bash", str(CHECK_SCRIPT), target], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(" 0 failed") or "no vector path" in result.stdout, result.stdout


def test_kernel_matches_mlx_on_smollm2_layers_and_tied_head(smollm2_package):
    package = LayerPackage.open(smollm2_package)
    manifest = package.manifest
    q = manifest.quantization
    tensors = mx.load(str(package.path(manifest.layer_files(5, 6)[0])))
    tensors.update(mx.load(str(package.path(manifest.shared["embed"]))))
    bases = [name.removesuffix(".scales") for name in tensors if name.endswith(".scales")]
    assert len(bases) == 8  # q, k, v, o, gate, up, down, and the embedding (the tied head)
    for base in bases:
        w, s, b = tensors[f"{base}.weight"], tensors[f"{base}.scales"], tensors[f"{base}.biases"]
        K = w.shape[1] * 32 // q.bits
        for rows in (1, 5, 8, 32):
            x = mx.random.normal((rows, K))
            ref = mx.quantized_matmul(x, w, s.astype(mx.float32), b.astype(mx.float32), transpose=True,
                                      group_size=q.group_size, bits=q.bits)
            # The package's own scales (f16), as the kernel reads them in a loaded model.
            got = packed_matmul(x, w, s, b, group_size=q.group_size, bits=q.bits, name=base)
            assert relative_error(got, ref) <= MAX_RELATIVE_ERROR, (base, rows, s.dtype)


def test_bad_shapes_and_unsupported_bits_are_refused_naming_the_tensor():
    q, s, b = mx.quantize(mx.random.normal((16, 128)), group_size=64, bits=4)
    x = mx.random.normal((2, 128))
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.up_proj: bits=7 is not supported"):
        packed_matmul(x, q, s, b, group_size=64, bits=7, name="layers.3.mlp.up_proj")
    with pytest.raises(ValueError, match=r"up_proj: input width 96 does not divide into groups of 64"):
        # 12 packed words of 4-bit values hold 96 values: not whole groups of 64.
        packed_matmul(mx.zeros((1, 96)), q[:, :12], s, b, group_size=64, bits=4, name="up_proj")
    with pytest.raises(ValueError, match=r"embed_tokens: input \(2, 100\) must end in 128"):
        packed_matmul(mx.zeros((2, 100)), q, s, b, group_size=64, bits=4, name="embed_tokens")
    with pytest.raises(ValueError, match=r"o_proj: scales \(16, 2\) and biases \(16, 2\) must both be"):
        packed_matmul(x, q, s, b, group_size=32, bits=4, name="o_proj")
    with pytest.raises(ValueError, match="group_size=16 is not supported"):
        packed_matmul(x, q, s, b, group_size=16, bits=4, name="o_proj")


def test_packed_package_decodes_on_the_kernel_exactly_as_in_f32(smollm2_package):
    packed = LocalPipeline.load(smollm2_package, weights="packed")
    kinds = {type(m) for _, m in packed.ranges[0].named_modules()} | {type(packed.head.embed_tokens)}
    assert {KernelQuantizedLinear, KernelQuantizedEmbedding} <= kinds and nn.QuantizedLinear not in kinds
    assert packed.head.embed_tokens["scales"].dtype == mx.float16  # read as stored, not widened
    expanded = LocalPipeline.load(smollm2_package, weights="f32")
    prompt = list(packed.tokenizer.encode("The history of computing is a story of"))

    def tokens(pipeline: LocalPipeline) -> list[int]:
        return [t.id for t in generate(LocalTarget.open(pipeline), prompt, SamplingParams(max_tokens=24))]

    assert tokens(packed) == tokens(expanded)


def test_auto_keeps_packed_weights_on_a_cpu_with_the_kernel(smollm2_package):
    manifest = LayerPackage.open(smollm2_package).manifest
    files = manifest.layer_files(0, manifest.num_layers)
    device = Device("cpu", fast_blas=True, memory_available=64 << 30, cpu_kernel="avx2")
    chosen = plan_weights("auto", manifest, files, device)
    assert (chosen.format, chosen.compute_dtype) == ("packed", "float32") and "cpu kernel" in chosen.reason
    assert plan_weights("f32", manifest, files, device).format == "f32"  # f32 stays available


@pytest.mark.slow
def test_without_the_kernel_run_falls_back_to_mlx_and_says_so_first(smollm2_package):
    env = {**os.environ, "LAYERLINE_CPU_KERNEL": "off"}
    argv = [sys.executable, "-m", "layerline", "run", str(smollm2_package), "--chat",
            "What is the capital of France?", "--max-tokens", "12"]
    off = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    on = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert off.returncode == 0 and on.returncode == 0, off.stderr + on.stderr
    assert "cpu_kernel=none (LAYERLINE_CPU_KERNEL=off" in off.stderr.splitlines()[0]
    assert off.stderr.count("event=cpu_kernel_missing") == 1
    assert "cpu_kernel=" in on.stderr and "weights=packed" in on.stderr and "cpu_kernel=none" not in on.stderr
    assert off.stdout == on.stdout and "Paris" in on.stdout


def test_bench_kernels_writes_its_table_against_bandwidth_and_mlx(tmp_path):
    argv = [sys.executable, "-m", "layerline", "bench", "kernels", "--shape", "512x256", "--rows", "1",
            "--rows", "8", "--working-set-mib", "4", "-o", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("| rows"))
    assert "of read bandwidth" in header and "× mlx's kernel" in header and "× one row" in header
    assert "8 rows cost" in result.stdout and "read bandwidth" in result.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert [r["rows"] for r in report["rows"]] == [1, 8] and report["read_gbps"] > 0
    assert (tmp_path / "chart.png").stat().st_size > 0 and (tmp_path / "table.md").exists()


def test_llama_bench_that_cannot_run_is_reported_with_how_to_build_it(tmp_path):
    from layerline.errors import LayerlineError
    from layerline.runtime.bench.llama_bench import run_llama_bench

    with pytest.raises(LayerlineError, match="cannot run") as caught:
        run_llama_bench(tmp_path / "llama-bench", tmp_path / "m.gguf", threads=2)
    assert "llama-cpp-python" in (caught.value.hint or "")
