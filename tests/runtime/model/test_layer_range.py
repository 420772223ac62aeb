"""Layer ranges: logits equal a model built from the GGUF, ranges chain, only a range's files load."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from layerline.errors import ChecksumError, LayerRangeError
from layerline.packager.architectures import model_module
from layerline.packager.gguf_source import GGUFSource
from layerline.packager.package import LayerPackage
from layerline.packager.weights import encode_tensors, parse_format
from layerline.runtime.decode.local_pipeline import LocalPipeline
from layerline.runtime.model.kv_cache import RangeCache
from layerline.runtime.model.layer_range import LayerRange
from layerline.runtime.model.weights_policy import WeightsPlan

TOKENS = [1, 504, 3458, 282, 4649, 314, 2114, 30, 1248, 2056, 17, 9]
F32 = WeightsPlan("f32", "float32", "test")


def gguf_reference_logits(gguf: Path, tokens: list[int], quantize: str | None = None) -> np.ndarray:
    """Logits of a whole mlx-lm model built straight from the GGUF's dequantized weights,
    optionally quantized the way a package of format `quantize` stores them."""
    source = GGUFSource(gguf)
    module = model_module(source.config["model_type"])
    model = module.Model(module.ModelArgs.from_dict(source.config))
    weights = {k: mx.array(v) for k, v in {**source.embed_tensors(), **source.head_tensors()}.items()}
    for i in range(source.num_layers):
        weights |= {f"model.layers.{i}.{k}": mx.array(v) for k, v in source.layer_tensors(i).items()}
    if quantize is not None:
        fmt = parse_format(quantize, 32)
        weights = encode_tensors({k: np.array(v) for k, v in weights.items()}, fmt)
        nn.quantize(model, group_size=32, bits=fmt.bits,
                    class_predicate=lambda path, _: f"{path}.scales" in weights)
        # f32 activations, as the runtime computes on CPU; packed values untouched.
        weights = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    model.load_weights(list(weights.items()))
    return np.array(model(mx.array([tokens])).astype(mx.float32))


def package_logits(package: Path, weights: str, tokens: list[int]) -> np.ndarray:
    pipeline = LocalPipeline.load(package, None, weights, tokenizer=False)
    return np.array(pipeline(mx.array([tokens]), pipeline.make_cache()))


def assert_close(got: np.ndarray, expected: np.ndarray, rel: float) -> None:
    scale = float(np.abs(expected).max())
    assert float(np.abs(got - expected).max()) <= rel * scale
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf) -> np.ndarray:
    return gguf_reference_logits(smollm2_gguf, TOKENS)


@pytest.mark.parametrize("weights", ["packed", "f32"])
def test_smollm2_f32_package_logits_equal_gguf_reference(smollm2_f32_package, smollm2_reference, weights):
    assert_close(package_logits(smollm2_f32_package, weights, TOKENS), smollm2_reference, rel=1e-5)


@pytest.mark.slow
def test_smollm2_4bit_package_logits_equal_gguf_reference_quantized_alike(smollm2_package,
                                                                          smollm2_gguf):
    expected = gguf_reference_logits(smollm2_gguf, TOKENS, quantize="4bit")
    assert_close(package_logits(smollm2_package, "packed", TOKENS), expected, rel=1e-5)
    # Expanding the packed values to f32 only changes the order of float sums.
    assert_close(package_logits(smollm2_package, "f32", TOKENS), expected, rel=1e-4)


@pytest.mark.slow
def test_qwen05_4bit_package_logits_equal_gguf_reference_quantized_alike(qwen05_package, qwen05_gguf):
    expected = gguf_reference_logits(qwen05_gguf, TOKENS, quantize="4bit")
    assert_close(package_logits(qwen05_package, "packed", TOKENS), expected, rel=1e-5)
    assert_close(package_logits(qwen05_package, "f32", TOKENS), expected, rel=1e-4)


def _chained_logits(pipeline: LocalPipeline, ranges: list[LayerRange], tokens: list[int]) -> np.ndarray:
    h = pipeline.head.embed(mx.array([tokens]))
    for layer_range in ranges:
        h = layer_range(h, RangeCache(layer_range.make_cache()).caches)
    return np.array(pipeline.head.logits(h))


def test_chained_ranges_give_the_logits_of_the_whole_model_for_every_cut(tiny_llama_package):
    package = LayerPackage.open(tiny_llama_package)
    whole = LocalPipeline.load(tiny_llama_package, None, "f32", tokenizer=False)
    expected = np.array(whole(mx.array([TOKENS]), whole.make_cache()))
    n = package.manifest.num_layers
    for cut in range(1, n):  # 1 and n-1 included
        ranges = [LayerRange.load(package, 0, cut, F32), LayerRange.load(package, cut, n, F32)]
        np.testing.assert_allclose(_chained_logits(whole, ranges, TOKENS), expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_smollm2_split_at_first_and_last_layer_matches_one_range(smollm2_f32_package):
    whole = LocalPipeline.load(smollm2_f32_package, None, "f32", tokenizer=False)
    expected = np.array(whole(mx.array([TOKENS]), whole.make_cache()))
    for split in ("0:1,1:30", "0:29,29:30", "0:7,7:19,19:30"):
        split_pipeline = LocalPipeline.load(smollm2_f32_package, split, "f32", tokenizer=False)
        got = np.array(split_pipeline(mx.array([TOKENS]), split_pipeline.make_cache()))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_a_range_allocates_only_its_own_layers(smollm2_f32_package):
    package = LayerPackage.open(smollm2_f32_package)
    before = mx.get_active_memory()
    three = LayerRange.load(package, 10, 13, F32)
    grown = mx.get_active_memory() - before
    params = tree_flatten(three.parameters())
    assert {name.split(".")[1] for name, _ in params} == {"0", "1", "2"}
    range_bytes = sum(v.nbytes for _, v in params)
    layer_file_bytes = sum(package.manifest.file(f).bytes for f in package.manifest.layer_files(10, 13))
    assert range_bytes <= layer_file_bytes
    all_layers = sum(package.manifest.file(f).bytes for f in package.manifest.layer_files(0, 30))
    assert grown <= 1.5 * range_bytes < all_layers / 5


def test_a_range_reads_only_its_files(smollm2_f32_package, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(smollm2_f32_package, copy)
    (copy / "layers/00020.safetensors").write_bytes(b"tampered")  # outside the range
    layer_range = LayerRange.load(LayerPackage.open(copy), 0, 2, F32)
    assert layer_range.num_layers == 2


def test_tampered_layer_file_is_refused_before_use_naming_it(smollm2_f32_package, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(smollm2_f32_package, copy)
    path = copy / "layers/00003.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"layers/00003\.safetensors \(sha256 mismatch\)"):
        LayerRange.load(LayerPackage.open(copy), 2, 5, F32)


def test_missing_layer_file_is_refused_naming_it(smollm2_f32_package, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(smollm2_f32_package, copy)
    (copy / "layers/00004.safetensors").unlink()
    with pytest.raises(ChecksumError, match=r"layers/00004\.safetensors \(missing\)"):
        LocalPipeline.load(copy, "0:10,10:30", "f32", tokenizer=False)


@pytest.mark.parametrize("start,end", [(0, 31), (-1, 3), (5, 5), (12, 7)])
def test_layer_range_outside_the_model_is_refused(smollm2_f32_package, start, end):
    with pytest.raises(LayerRangeError, match="outside the model's 30 layers"):
        LayerRange.load(LayerPackage.open(smollm2_f32_package), start, end, F32)
