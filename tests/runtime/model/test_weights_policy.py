"""Weight-format policy per device, and the BLAS mlx uses on Linux."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from layerline.errors import LayerlineError
from layerline.packager.package import LayerPackage
from layerline.runtime.model.blas import candidate_paths, global_cblas, load_fast_blas
from layerline.runtime.model.weights_policy import Device, expanded_bytes, plan_weights

GIB = 1 << 30


def plan(package_dir, requested: str, device: Device):
    manifest = LayerPackage.open(package_dir).manifest
    files = manifest.layer_files(0, manifest.num_layers)
    return plan_weights(requested, manifest, files, device)


def test_auto_expands_packed_weights_to_f32_on_linux_cpu_with_fast_blas(smollm2_package):
    chosen = plan(smollm2_package, "auto", Device("cpu", fast_blas=True, memory_available=8 * GIB))
    assert (chosen.format, chosen.compute_dtype) == ("f32", "float32")


def test_auto_keeps_weights_packed_without_fast_blas_and_says_why(smollm2_package):
    chosen = plan(smollm2_package, "auto", Device("cpu", fast_blas=False, memory_available=8 * GIB))
    assert (chosen.format, chosen.compute_dtype) == ("packed", "float32")
    assert "no fast BLAS" in chosen.reason


def test_auto_keeps_weights_packed_when_f32_would_not_fit_in_memory(smollm2_package):
    chosen = plan(smollm2_package, "auto", Device("cpu", fast_blas=True, memory_available=200 << 20))
    assert chosen.format == "packed" and "MiB available" in chosen.reason


@pytest.mark.parametrize("kind", ["metal", "cuda"])
def test_auto_keeps_weights_packed_on_gpus(smollm2_package, kind):
    chosen = plan(smollm2_package, "auto", Device(kind, fast_blas=True, memory_available=8 * GIB))
    assert (chosen.format, chosen.compute_dtype) == ("packed", "float16")


@pytest.mark.parametrize("requested,dtype", [("f32", "float32"), ("bf16", "bfloat16"), ("f16", "float16")])
def test_explicit_float_format_is_obeyed(smollm2_package, requested, dtype):
    chosen = plan(smollm2_package, requested, Device("cpu", fast_blas=True, memory_available=8 * GIB))
    assert (chosen.format, chosen.compute_dtype) == (requested, dtype)


def test_unknown_weight_format_is_refused(smollm2_package):
    with pytest.raises(LayerlineError, match="unknown weight format 'int3'"):
        plan(smollm2_package, "int3", Device("cpu", fast_blas=True, memory_available=8 * GIB))


def test_expanded_size_of_4bit_weights_is_eight_times_the_files(smollm2_package):
    manifest = LayerPackage.open(smollm2_package).manifest
    files = manifest.layer_files(0, 2)
    assert expanded_bytes(manifest, files) == 8 * sum(manifest.file(f).bytes for f in files)


@pytest.mark.skipif(not any(os.path.exists(p) for p in candidate_paths()),
                    reason="no OpenBLAS/BLIS installed (apt-get install libopenblas0-pthread)")
def test_importing_layerline_gives_mlx_an_optimized_blas_even_after_numpy():
    # conftest imports numpy (which bundles a private OpenBLAS mlx cannot use) before layerline.
    info = load_fast_blas()
    assert info.fast and info.name in ("openblas", "blis"), info.describe()
    provider = global_cblas()
    assert provider is not None and info.name in provider and "numpy" not in provider


def test_without_a_fast_blas_run_still_works_and_says_so(tiny_llama_package):
    env = {**os.environ, "LAYERLINE_BLAS": "reference"}
    result = subprocess.run(
        [sys.executable, "-m", "layerline", "run", str(tiny_llama_package), "--prompt", "Hello",
         "--max-tokens", "3"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "blas=reference" in result.stderr and "fast=no" in result.stderr
    assert "weights=f32" in result.stderr
    assert "decode 3 tok" in result.stderr
