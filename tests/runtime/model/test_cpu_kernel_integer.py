"""The CPU kernel's integer path (x quantized to int8 or int16 per block of 32, integer
multiply-adds): against mlx's dequantized product on each instruction-set path, on SmolLM2's
real layers, its setting, and its error on a real package as the benchmark reports it; and the
integer path for many rows (8 or more rows of 4-bit weights on AVX-512 VNNI, when asked for)."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import pytest

from layerline.packager.package import LayerPackage
from layerline.runtime.model.cpu_kernel import (
    INTEGER_ENV_VAR,
    ROWS_ENV_VAR,
    cpu_kernel,
    gemv_x,
    integer_rows,
    packed_matmul,
    rows_setting,
)

from helpers import sweep_on_isa

pytestmark = pytest.mark.skipif(not cpu_kernel().available, reason=f"no CPU kernel: {cpu_kernel().reason}")

# A product's largest error against the largest |y|. int8 x rounds each value to 1/254 of its
# block's largest: under 2 % (measured 0.5-1.3 % on random weights); int16 x to 1/65534: within
# the f32 paths' own bound (measured 3-4e-5).
MAX_RELATIVE_ERROR = {8: 2e-2, 16: 1e-4}
EXACT_RELATIVE_ERROR = 1e-4  # products the integer path does not take stay the f32 ones
# Many rows: x to 1/16382 of its span's largest, scales to 1/2046 of theirs (measured 3-6e-4 on
# random weights, whose scales differ 32x within a span; a real model's far less).
ROWS_RELATIVE_ERROR = 1e-3
ROWS_MIN = 8  # fewer rows stay on the f32 path

# A fresh process per path: the kernel picks its instruction set once per process.
_SWEEP = r"""
import json
import mlx.core as mx
from layerline.runtime.model.cpu_kernel import cpu_kernel, gemv_x, packed_matmul

mx.random.seed(11)
worst, exact, differs = {}, 0.0, {8: True, 16: True}
for bits in (4, 5, 8):
    for group in (32, 64, 128):
        for N, K in ((37, group * 5), (413, 2048)):  # odd rows (every tail); several groups
            q, s, b = mx.quantize(mx.random.normal((N, K)), group_size=group, bits=bits)
            x = mx.random.normal((3, K))
            for dtype in (mx.float32, mx.float16, mx.bfloat16):
                s_, b_ = s.astype(dtype), b.astype(dtype)
                s32, b32 = s_.astype(mx.float32), b_.astype(mx.float32)
                with gemv_x(None):
                    f32_x = packed_matmul(x[:1], q, s_, b_, group_size=group, bits=bits, name="random")
                    mx.eval(f32_x)
                for x_bits in (8, 16):
                    with gemv_x(x_bits):
                        for rows in (1, 3):
                            ref = mx.quantized_matmul(x[:rows], q, s32, b32, transpose=True, group_size=group,
                                                      bits=bits)
                            got = packed_matmul(x[:rows], q, s_, b_, group_size=group, bits=bits,
                                                name="random")
                            err = (mx.abs(got - ref).max() / mx.abs(ref).max()).item()
                            if rows == 1:
                                key = f"x={x_bits} bits={bits} group={group}"
                                worst[key] = max(worst.get(key, 0.0), err)
                                differs[x_bits] &= not mx.array_equal(got, f32_x).item()
                            else:
                                exact = max(exact, err)
print(json.dumps({"isa": cpu_kernel().isa, "worst": worst, "exact": exact, "differs": differs}))
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "neon", "portable"])
def test_integer_gemv_matches_mlx_within_its_rounding_on_each_path(isa):
    report = sweep_on_isa(_SWEEP, isa)
    assert len(report["worst"]) == 18
    bad = {k: v for k, v in report["worst"].items() if not v <= MAX_RELATIVE_ERROR[int(k[2:4])]}
    assert not bad
    assert report["differs"] == {"8": True, "16": True}  # the integer path did run, on every one-row case
    assert report["exact"] <= EXACT_RELATIVE_ERROR  # 3 rows: the f32 product


@pytest.mark.parametrize("x_bits", [8, 16])
def test_integer_gemv_matches_mlx_on_smollm2_layers_and_tied_head(smollm2_package, x_bits):
    package = LayerPackage.open(smollm2_package)
    manifest = package.manifest
    files = [(manifest.layer_files(5, 6)[0], "model.layers.5."), (manifest.shared["embed"], "")]
    widths = set()
    for path, prefix in files:
        tensors = mx.load(str(package.path(path)))
        for base in [name.removesuffix(".scales") for name in tensors if name.endswith(".scales")]:
            w, s, b = tensors[f"{base}.weight"], tensors[f"{base}.scales"], tensors[f"{base}.biases"]
            fmt = manifest.quantization.format_of(prefix + base)
            widths.add(fmt.bits)
            # One row (the GEMV); with int16 x also 32 rows on the path for many rows (4-bit weights).
            for rows in (1, 32) if x_bits == 16 else (1,):
                x = mx.random.normal((rows, w.shape[1] * 32 // fmt.bits))
                ref = mx.quantized_matmul(x, w, s.astype(mx.float32), b.astype(mx.float32), transpose=True,
                                          group_size=fmt.group_size, bits=fmt.bits)
                with gemv_x(x_bits), integer_rows(rows > 1):
                    got = packed_matmul(x, w, s, b, group_size=fmt.group_size, bits=fmt.bits, name=base)
                    mx.eval(got)
                err = (mx.abs(got - ref).max() / mx.abs(ref).max()).item()
                bound = MAX_RELATIVE_ERROR[x_bits] if rows == 1 else ROWS_RELATIVE_ERROR
                assert err <= bound, (base, fmt.bits, rows, err)
    assert 4 in widths and len(widths) <= 2  # the 4-bit layers and the tied head (4- or 8-bit)


def test_integer_settings_are_reported_and_bad_ones_refused():
    probe = "from layerline.runtime.model.cpu_kernel import cpu_kernel; print(cpu_kernel().describe())"
    env = {k: v for k, v in os.environ.items() if k not in (INTEGER_ENV_VAR, ROWS_ENV_VAR)}

    def describe(setting: str | None) -> subprocess.CompletedProcess:
        extra = {} if setting is None else {INTEGER_ENV_VAR: setting}
        return subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True,
                              text=True, timeout=120)

    isa = cpu_kernel().integer_isa
    # The default: int16 x where this machine measured it faster at load, else f32 x; never int8 x;
    # many rows in f32 unless asked for.
    assert describe(None).stdout.strip().endswith((" gemv_x=f32 rows_x=f32",
                                                    f" gemv_x=int16({isa}) rows_x=f32"))
    assert describe("off").stdout.strip().endswith(" gemv_x=f32 rows_x=f32")
    assert describe("int8").stdout.strip().endswith(f" gemv_x=int8({isa}) rows_x=f32")
    bad = describe("sometimes")
    assert bad.returncode != 0
    assert "LAYERLINE_CPU_INTEGER_X='sometimes': expected one of off, int8, int16, auto" in bad.stderr

    rows = cpu_kernel().rows_isa
    asked = subprocess.run([sys.executable, "-c", probe], env={**env, ROWS_ENV_VAR: "on"},
                           capture_output=True, text=True, timeout=120)
    assert asked.stdout.strip().endswith(" rows_x=f32" if rows == "none" else f" rows_x=int14({rows})")


def test_a_bad_integer_rows_setting_is_refused(monkeypatch):
    monkeypatch.setenv(ROWS_ENV_VAR, "always")
    with pytest.raises(ValueError, match="LAYERLINE_CPU_INTEGER_ROWS='always': expected one of off, on"):
        rows_setting()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_many_rows_of_4_bit_weights_match_mlx_within_their_rounding(group):
    mx.random.seed(group)
    K = 1152  # three spans of x, the last short
    q, s, b = mx.quantize(mx.random.normal((37, K)), group_size=group, bits=4)
    x = mx.random.normal((40, K))
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        s_, b_ = s.astype(dtype), b.astype(dtype)
        for rows in (ROWS_MIN - 1, ROWS_MIN, 40):
            ref = mx.quantized_matmul(x[:rows], q, s_.astype(mx.float32), b_.astype(mx.float32),
                                      transpose=True, group_size=group, bits=4)
            with integer_rows(False):
                f32_x = packed_matmul(x[:rows], q, s_, b_, group_size=group, bits=4, name="random")
                mx.eval(f32_x)
            with integer_rows(True):
                got = packed_matmul(x[:rows], q, s_, b_, group_size=group, bits=4, name="random")
                mx.eval(got)
            err = (mx.abs(got - ref).max() / mx.abs(ref).max()).item()
            integer = rows >= ROWS_MIN and cpu_kernel().rows_isa != "none"
            assert err <= (ROWS_RELATIVE_ERROR if integer else EXACT_RELATIVE_ERROR), (dtype, rows, err)
            # The integer path ran where it exists, and only there.
            assert mx.array_equal(got, f32_x).item() is not integer, (dtype, rows)


@pytest.mark.slow
def test_integer_fidelity_on_smollm2_is_reported_against_f32_x(smollm2_package):
    from layerline.runtime.bench.integer_fidelity import measure_integer_fidelity

    int8, int16 = measure_integer_fidelity(smollm2_package, greedy_tokens=16)
    assert (int8.x, int16.x) == ("int8", "int16")
    assert int8.fidelity.text_tokens == 64 and int8.greedy_tokens == 16
    # int8 x: mean KL 6e-3 on this 4-bit SmolLM2 (its greedy tokens differ): never the default.
    assert 0 < int8.fidelity.mean_kl < 2e-2
    assert int16.fidelity.mean_kl < 1e-5 and int16.fidelity.top1_agreement == 1.0
    assert int16.describe().startswith(f"int16 x ({cpu_kernel().integer_isa}): mean KL ")
    # The text as one 64-row chunk: its 4-bit products on the integer path for many rows where there
    # is one (mean KL 2e-5 on this package), else the f32 ones.
    assert int16.chunk is not None and int8.chunk is None
    assert int16.chunk.mean_kl < 1e-4 and int16.chunk.top1_agreement >= 0.98
    assert "the text as one chunk: mean KL " in int16.describe()
