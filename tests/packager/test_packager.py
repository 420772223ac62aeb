"""`layerline pkg build / inspect / verify` on real GGUF files and tiny models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from layerline.errors import (
    ChecksumError,
    ManifestError,
    PackageExistsError,
    SourceError,
    TokenizerMismatchError,
    UnsupportedArchitectureError,
)
from layerline.packager.build import BuildOptions, build_package
from layerline.packager.gguf_source import unpermute_qk
from layerline.packager.inspect import inspect_package
from layerline.packager.manifest import MANIFEST_NAME, SCHEMA_VERSION, parse_manifest, read_manifest
from layerline.packager.package import LayerPackage, sha256_file
from layerline.packager.speculative import DraftSpec
from layerline.packager.verify import verify_package
from layerline.packager.window_spec import WindowError, WindowSpec

LAYERLINE = [sys.executable, "-m", "layerline"]


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*LAYERLINE, *args], capture_output=True, text=True, timeout=600,
                          **kwargs)


def layer_weight(package: Path, layer: int, name: str) -> np.ndarray:
    """A layer tensor from a package, dequantized to float32 if it is packed."""
    tensors = mx.load(str(package / f"layers/{layer:05d}.safetensors"))
    base = name[: -len(".weight")]
    if f"{base}.scales" in tensors:
        quant = read_manifest(package).quantization
        assert quant is not None
        fmt = quant.format_of(f"model.layers.{layer}.{base}")
        # f32 scales, as the runtime expands them: f16 arithmetic would round the values.
        values = mx.dequantize(tensors[name], tensors[f"{base}.scales"].astype(mx.float32),
                               tensors[f"{base}.biases"].astype(mx.float32),
                               group_size=fmt.group_size, bits=fmt.bits)
        return np.array(values.astype(mx.float32))
    return np.array(tensors[name].astype(mx.float32))


def gguf_weight(reader: GGUFReader, gguf_name: str) -> np.ndarray:
    tensor = next(t for t in reader.tensors if t.name == gguf_name)
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# ---------------------------------------------------------------- real models


def test_smollm2_f32_package_holds_the_exact_gguf_dequantization(smollm2_gguf, smollm2_f32_package):
    reader = GGUFReader(str(smollm2_gguf))
    manifest = read_manifest(smollm2_f32_package)
    heads, kv_heads = manifest.config["num_attention_heads"], manifest.config["num_key_value_heads"]
    for layer in (0, 17, 29):
        expected_q = unpermute_qk(gguf_weight(reader, f"blk.{layer}.attn_q.weight"), heads)
        expected_k = unpermute_qk(gguf_weight(reader, f"blk.{layer}.attn_k.weight"), kv_heads)
        np.testing.assert_array_equal(
            layer_weight(smollm2_f32_package, layer, "self_attn.q_proj.weight"), expected_q)
        np.testing.assert_array_equal(
            layer_weight(smollm2_f32_package, layer, "self_attn.k_proj.weight"), expected_k)
        np.testing.assert_array_equal(
            layer_weight(smollm2_f32_package, layer, "mlp.down_proj.weight"),
            gguf_weight(reader, f"blk.{layer}.ffn_down.weight"))


@pytest.mark.slow
def test_smollm2_4bit_package_is_within_4bit_error_of_the_gguf(smollm2_gguf, smollm2_package):
    reader = GGUFReader(str(smollm2_gguf))
    manifest = read_manifest(smollm2_package)
    assert manifest.quantization is not None and manifest.quantization.bits == 4
    assert manifest.model.architecture == "llama"
    assert manifest.num_layers == 30
    for local, gguf_name in [("mlp.up_proj.weight", "ffn_up"), ("self_attn.v_proj.weight", "attn_v"),
                             ("self_attn.o_proj.weight", "attn_output")]:
        expected = gguf_weight(reader, f"blk.5.{gguf_name}.weight")
        # 4-bit affine with groups of 32 keeps the relative error of a weight matrix near 10 %.
        assert relative_error(layer_weight(smollm2_package, 5, local), expected) < 0.15
    norm = np.array(mx.load(str(smollm2_package / "layers/00005.safetensors"))
                    ["input_layernorm.weight"].astype(mx.float32))
    np.testing.assert_allclose(norm, gguf_weight(reader, "blk.5.attn_norm.weight"), rtol=1e-3)


@pytest.mark.slow
def test_smollm2_exact_package_holds_the_gguf_blocks_bit_exactly(smollm2_gguf, smollm2_exact_package):
    reader = GGUFReader(str(smollm2_gguf))
    manifest = read_manifest(smollm2_exact_package)
    heads, kv_heads = manifest.config["num_attention_heads"], manifest.config["num_key_value_heads"]
    for layer in (0, 29):
        # Q and K rows are unpermuted on the packed form, with their scales and biases.
        for local, gguf_name, permuted_heads in [("self_attn.q_proj.weight", "attn_q", heads),
                                                 ("self_attn.k_proj.weight", "attn_k", kv_heads),
                                                 ("mlp.down_proj.weight", "ffn_down", None)]:
            expected = gguf_weight(reader, f"blk.{layer}.{gguf_name}.weight")
            if permuted_heads:
                expected = unpermute_qk(expected, permuted_heads)
            np.testing.assert_array_equal(layer_weight(smollm2_exact_package, layer, local), expected)
    embed = mx.load(str(smollm2_exact_package / "shared/embed.safetensors"))
    fmt = manifest.quantization.format_of("model.embed_tokens")
    assert (fmt.bits, fmt.group_size) == (8, 32)  # the GGUF's token_embd is Q8_0
    scales, biases = (embed[f"model.embed_tokens.{k}"].astype(mx.float32) for k in ("scales", "biases"))
    values = mx.dequantize(embed["model.embed_tokens.weight"], scales, biases, group_size=32, bits=8)
    np.testing.assert_array_equal(np.array(values), gguf_weight(reader, "token_embd.weight"))
    # The logits of bit-exact weights are the reference's own, and inspect says so.
    summary = inspect_package(smollm2_exact_package)
    assert summary["fidelity"] == {"reference": "source dequantized to float32", "text_tokens": 64,
                                   "mean_kl": 0.0, "top1_agreement": 1.0}
    assert summary["quantization"]["gguf_types"] == {
        "Q4_1": {"tensors": 210, "bits": 4, "group_size": 32, "held_as": "exact"},
        "Q8_0": {"tensors": 1, "bits": 8, "group_size": 32, "held_as": "exact"}}
    assert summary["weights"] == "4-bit affine, group 32 (1 tensor 8-bit/32)"


@pytest.mark.slow
def test_exact_package_logits_in_the_runtime_match_the_gguf_f32_reference(smollm2_exact_package,
                                                                          smollm2_f32_package):
    from layerline.runtime.decode.local_pipeline import LocalPipeline

    reference = LocalPipeline.load(smollm2_f32_package, weights="f32", tokenizer=False)
    tokens = mx.array([[1, 504, 3458, 282, 4649, 314, 2]])
    expected = np.array(reference(tokens, reference.make_cache()))
    for weights in ("packed", "f32"):  # mlx's quantized kernel, and the weights expanded
        exact = LocalPipeline.load(smollm2_exact_package, "0:12,12:30", weights=weights, tokenizer=False)
        got = np.array(exact(tokens, exact.make_cache()))
        np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max())
        assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_exact_needs_a_gguf_source_and_other_sources_default_to_4bit(tiny_llama, tmp_path):
    with pytest.raises(SourceError, match="--quantize exact applies to GGUF sources"):
        build_package(str(tiny_llama["folder"]), tmp_path / "exact",
                      BuildOptions(quantize="exact", quiet=True))
    assert not (tmp_path / "exact").exists()
    manifest = build_package(str(tiny_llama["folder"]), tmp_path / "default", BuildOptions(quiet=True))
    assert manifest.quantization is not None and manifest.quantization.bits == 4
    assert manifest.fidelity is not None and manifest.fidelity.mean_kl > 0  # 4-bit loses a little


@pytest.mark.slow
def test_qwen05_q4_k_m_exact_package_is_within_the_kl_goal(qwen05_gguf, tmp_path):
    manifest = build_package(str(qwen05_gguf), tmp_path / "pkg", BuildOptions(quiet=True))
    quant = manifest.quantization
    assert quant is not None and quant.gguf_types["Q4_K"].held_as == "scales rounded to f16"
    assert quant.gguf_types["Q6_K"].bits == 8  # re-quantized with at least its 6.6 bits per weight
    assert manifest.fidelity is not None
    assert manifest.fidelity.mean_kl <= 1e-3 and manifest.fidelity.top1_agreement >= 0.9


@pytest.mark.slow
def test_qwen05_k_quant_package_matches_the_gguf(qwen05_gguf, qwen05_package):
    reader = GGUFReader(str(qwen05_gguf))
    manifest = read_manifest(qwen05_package)
    assert manifest.model.architecture == "qwen2"
    assert manifest.num_layers == 24
    assert manifest.config["tie_word_embeddings"] is False  # this GGUF ships output.weight
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    checked = set()
    for layer in (0, 11, 23):
        for local, gguf_name in [("mlp.down_proj.weight", "ffn_down"),
                                 ("mlp.gate_proj.weight", "ffn_gate"),
                                 ("self_attn.q_proj.weight", "attn_q"),
                                 ("self_attn.v_proj.weight", "attn_v")]:
            name = f"blk.{layer}.{gguf_name}.weight"
            checked.add(types[name])
            # Qwen2 is not permuted by llama.cpp's converter.
            assert relative_error(layer_weight(qwen05_package, layer, local),
                                  gguf_weight(reader, name)) < 0.15
    assert {"Q5_0", "Q6_K", "Q8_0"} <= checked or {"Q4_K", "Q6_K"} <= checked
    bias = np.array(mx.load(str(qwen05_package / "layers/00000.safetensors"))
                    ["self_attn.q_proj.bias"].astype(mx.float32))
    np.testing.assert_allclose(bias, gguf_weight(reader, "blk.0.attn_q.bias"), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_gguf_and_safetensors_builds_hold_identical_tensors(tiny_llama, tmp_path):
    from_folder = build_package(str(tiny_llama["folder"]), tmp_path / "hf",
                                BuildOptions(quantize="f32", quiet=True))
    # An F32 GGUF builds `exact` by default: its tensors stay f32, as they are.
    from_gguf = build_package(str(tiny_llama["gguf"]), tmp_path / "gguf", BuildOptions(quiet=True))
    assert (from_gguf.quantization, from_gguf.dtype) == (None, "float32")
    assert from_gguf.fidelity is not None and from_gguf.fidelity.mean_kl == 0.0
    assert from_folder.config == from_gguf.config
    assert from_folder.tokenizer.fingerprint == from_gguf.tokenizer.fingerprint
    assert from_folder.model.source.kind == "safetensors"
    assert from_gguf.model.source.kind == "gguf"
    for rel in [*from_folder.layers.values(), *from_folder.shared.values()]:
        a, b = mx.load(str(tmp_path / "hf" / rel)), mx.load(str(tmp_path / "gguf" / rel))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(np.array(a[key]), np.array(b[key]), err_msg=f"{rel} {key}")
    # ...and both equal the weights the model was written from.
    np.testing.assert_array_equal(
        layer_weight(tmp_path / "gguf", 2, "self_attn.q_proj.weight"),
        tiny_llama["weights"]["model.layers.2.self_attn.q_proj.weight"])


@pytest.mark.parametrize("quantize, bits, dtype", [("8bit", 8, "float16"), ("bf16", None, "bfloat16"),
                                                   ("f16", None, "float16")])
def test_every_weight_format_builds_and_round_trips(tiny_llama, tmp_path, quantize, bits, dtype):
    manifest = build_package(str(tiny_llama["folder"]), tmp_path / quantize,
                             BuildOptions(quantize=quantize, quiet=True))
    assert manifest.dtype == dtype
    assert (manifest.quantization.bits if manifest.quantization else None) == bits
    expected = tiny_llama["weights"]["model.layers.1.mlp.up_proj.weight"]
    actual = layer_weight(tmp_path / quantize, 1, "mlp.up_proj.weight")
    assert relative_error(actual, expected) < (0.02 if bits == 8 else 0.01)


def test_manifest_lists_every_file_with_its_sha256(smollm2_package):
    manifest = read_manifest(smollm2_package)
    on_disk = sorted(str(p.relative_to(smollm2_package)) for p in smollm2_package.rglob("*")
                     if p.is_file() and p.name != MANIFEST_NAME)
    assert sorted(f.path for f in manifest.files) == on_disk
    for entry in manifest.files[:5]:
        assert sha256_file(smollm2_package / entry.path) == entry.sha256
        assert (smollm2_package / entry.path).stat().st_size == entry.bytes
    assert manifest.layers[0] == "layers/00000.safetensors"
    assert manifest.layers[29] == "layers/00029.safetensors"
    assert manifest.shared == {"embed": "shared/embed.safetensors", "head": "shared/head.safetensors"}
    assert manifest.model.id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert manifest.model.source.sha256 == sha256_file(
        Path(os.environ.get("LAYERLINE_CACHE", Path.home() / ".cache/layerline")) / "models"
        / manifest.model.source.file_name)
    assert manifest.tokenizer.fingerprint.startswith("sha256:")
    assert "<|im_start|>" in manifest.tokenizer.chat_template
    # The manifest survives a write/read round trip unchanged.
    raw = json.loads((smollm2_package / MANIFEST_NAME).read_text())
    assert parse_manifest(raw).to_json() == raw


def test_package_tokenizer_renders_the_chat_template_and_encodes(smollm2_package):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_package))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer.encode("The capital of France is Paris.")
    assert tokenizer.decode(ids) == "The capital of France is Paris."
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == read_manifest(
        smollm2_package).tokenizer.eos_token_id


def test_inspect_reports_architecture_layers_sizes_and_tokenizer(smollm2_package):
    summary = inspect_package(smollm2_package)
    assert summary["architecture"] == "llama"
    assert summary["layers"] == 30
    assert summary["quantization"] == {"mode": "affine", "bits": 4, "group_size": 32}
    assert summary["tokenizer"]["vocab_size"] == 49152
    assert summary["bytes"]["total"] > summary["bytes"]["layers"] > 0
    done = run_cli("pkg", "inspect", str(smollm2_package), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---------------------------------------------------------------- speculation block


def test_matching_local_draft_is_written_and_read_back(tiny_llama, smollm2_package, tmp_path):
    drafts = [DraftSpec(reference=str(smollm2_package), name="smol",
                        window_spec=WindowSpec("fixed", 4, 2, 8)),
              DraftSpec(reference="org/remote-draft:Q4_K_M", name="remote"),
              DraftSpec(reference="ngram", name="lookup", window_spec=WindowSpec("fixed", 4, 1))]
    manifest = build_package(str(tiny_llama["folder"]), tmp_path / "pkg",
                             BuildOptions(quantize="f32", drafts=drafts,
                                          default_strategy="smol", quiet=True))
    spec = read_manifest(tmp_path / "pkg").speculative_decoding
    assert spec is not None and spec == manifest.speculative_decoding
    assert spec.default == "smol"
    smol = spec.strategies["smol"]
    assert smol.type == "draft-model"
    assert smol.draft_model == str(smollm2_package)
    assert smol.tokenizer_fingerprint == read_manifest(smollm2_package).tokenizer.fingerprint
    assert smol.window_spec == WindowSpec("fixed", 4, 2, 8)
    assert spec.strategies["remote"].draft_model == "org/remote-draft:Q4_K_M"
    lookup = spec.strategies["lookup"]
    assert (lookup.type, lookup.draft_model, lookup.tokenizer_fingerprint) == ("ngram", None, None)
    raw = json.loads((tmp_path / "pkg" / MANIFEST_NAME).read_text())
    block = raw["generation"]["speculative_decoding"]
    assert raw["schema_version"] == SCHEMA_VERSION
    smol_json = block["strategies"]["smol"]
    assert {k: smol_json[k] for k in ("window_policy", "initial_window", "min_window", "max_window")} == {
        "window_policy": "fixed", "initial_window": 4, "min_window": 2, "max_window": 8}


@pytest.mark.slow
def test_draft_with_another_tokenizer_is_refused(qwen05_gguf, smollm2_package, tmp_path):
    out = tmp_path / "qwen"
    with pytest.raises(TokenizerMismatchError, match="tokenizer"):
        build_package(str(qwen05_gguf), out,
                      BuildOptions(drafts=[DraftSpec(reference=str(smollm2_package))], quiet=True))
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no staging folder left behind


def test_bad_window_policy_is_refused(tiny_llama, smollm2_package, tmp_path):
    with pytest.raises(WindowError, match="out of order: min_window 2, initial_window 32, max_window 16"):
        draft = DraftSpec(reference=str(smollm2_package), window_spec=WindowSpec(initial=32))
        build_package(str(tiny_llama["folder"]), tmp_path / "x", BuildOptions(drafts=[draft], quiet=True))
    assert not (tmp_path / "x").exists()


def test_version_1_manifests_are_still_read(tiny_llama, tmp_path):
    drafts = [DraftSpec(reference="ngram", name="lookup", window_spec=WindowSpec("fixed", 5, 2, 9))]
    build_package(str(tiny_llama["folder"]), tmp_path / "pkg",
                  BuildOptions(quantize="f32", drafts=drafts, quiet=True))
    raw = json.loads((tmp_path / "pkg" / MANIFEST_NAME).read_text())
    # Version 1 nested a strategy's window under `window_policy`, its kind under `default`.
    lookup = raw["generation"]["speculative_decoding"]["strategies"]["lookup"]
    lookup["window_policy"] = {"default": lookup.pop("window_policy"),
                               **{k: lookup.pop(k) for k in ("initial_window", "min_window", "max_window")}}
    raw["schema_version"] = 1
    manifest = parse_manifest(raw)
    assert manifest.speculative_decoding.strategies["lookup"].window_spec == WindowSpec("fixed", 5, 2, 9)
    assert manifest.to_json()["schema_version"] == SCHEMA_VERSION  # written back in today's layout
    del lookup["window_policy"]  # a version 1 strategy without one took the defaults
    assert parse_manifest(raw).speculative_decoding.strategies["lookup"].window_spec == WindowSpec()


# ---------------------------------------------------------------- bad input


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        build_package(str(tmp_path / "nope.gguf"), tmp_path / "out")
    done = run_cli("pkg", "build", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "out"))
    assert done.returncode == 1
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_not_a_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model\n")
    with pytest.raises(SourceError, match="not a GGUF file"):
        build_package(str(fake), tmp_path / "out")


def test_truncated_gguf_is_refused(smollm2_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(40 << 20))
    with pytest.raises(SourceError, match="truncated|corrupt"):
        build_package(str(truncated), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_names_the_supported_ones(tiny_llama, tmp_path):
    folder = tmp_path / "neox"
    shutil.copytree(tiny_llama["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(UnsupportedArchitectureError,
                       match="unsupported architecture 'gpt_neox'; supported: gemma2, gemma3_text, granite, "
                             "llama, mistral, mixtral, olmo2, phi3, qwen2, qwen3, qwen3_moe"):
        build_package(str(folder), tmp_path / "out")


def test_existing_output_is_refused_unless_forced(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PackageExistsError, match="--force"):
        build_package(str(tiny_llama["folder"]), out, BuildOptions(quiet=True))
    assert (out / "keep.txt").read_text() == "mine"
    build_package(str(tiny_llama["folder"]), out, BuildOptions(quiet=True, force=True))
    assert (out / MANIFEST_NAME).is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_tampered_layer_file_fails_verify_naming_it(tiny_llama, tmp_path):
    out = tmp_path / "pkg"
    build_package(str(tiny_llama["folder"]), out, BuildOptions(quiet=True))
    assert verify_package(out, quiet=True) > 0
    layer = out / "layers/00002.safetensors"
    data = bytearray(layer.read_bytes())
    data[-10] ^= 0xFF
    layer.write_bytes(bytes(data))
    (out / "layers/00003.safetensors").unlink()
    with pytest.raises(ChecksumError) as caught:
        verify_package(out, quiet=True)
    assert caught.value.bad_files == ["layers/00002.safetensors (sha256 mismatch)",
                                      "layers/00003.safetensors (missing)"]
    done = run_cli("pkg", "verify", str(out), "-q")
    assert done.returncode == 1
    assert "layers/00002.safetensors" in done.stderr and "layers/00003.safetensors" in done.stderr


def test_manifest_paths_outside_the_package_are_refused(tiny_llama, tmp_path):
    out = tmp_path / "pkg"
    build_package(str(tiny_llama["folder"]), out, BuildOptions(quiet=True))
    raw = json.loads((out / MANIFEST_NAME).read_text())
    for bad in ("../x", "/etc/passwd", "layers/../../x"):
        tampered = json.loads(json.dumps(raw))
        tampered["layers"]["0"] = bad
        tampered["files"][0]["path"] = bad
        with pytest.raises(ManifestError, match="unsafe path"):
            parse_manifest(tampered)
    raw["layers"]["0"] = "../x"
    (out / MANIFEST_NAME).write_text(json.dumps(raw))
    done = run_cli("pkg", "verify", str(out))
    assert done.returncode == 1 and "unsafe path '../x'" in done.stderr


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(schema_version=7), "unknown schema_version 7"),
    (lambda m: m.pop("tokenizer"), "field 'tokenizer' is missing"),
    (lambda m: m["model"].pop("architecture"), "field 'model.architecture' is missing"),
    (lambda m: m.update(format="something-else"), "format is 'something-else'"),
    (lambda m: m["files"][0].update(bytes="12"), "'files[0].bytes' must be an integer"),
    (lambda m: m["quantization"].update(tensors={"lm_head": {"bits": 8}}),
     "'quantization.tensors.lm_head.group_size' is missing"),
    (lambda m: m.update(fidelity={"reference": "x", "text_tokens": 64, "mean_kl": "low",
                                  "top1_agreement": 1.0}), "'fidelity.mean_kl' must be"),
])
def test_malformed_manifests_are_refused_naming_the_field(smollm2_package, change, message):
    raw = json.loads((smollm2_package / MANIFEST_NAME).read_text())
    change(raw)
    with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_manifest(raw)


def test_package_refuses_to_open_a_folder_without_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not a layer package"):
        LayerPackage.open(tmp_path)


@pytest.mark.slow
def test_interrupted_build_leaves_nothing_behind(smollm2_gguf, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([*LAYERLINE, "pkg", "build", str(smollm2_gguf), "-o", str(out),
                                "--quantize", "f32"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               # A shell's background jobs ignore SIGINT; a user's terminal doesn't.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    # Interrupt once the build has written some layers.
    while time.monotonic() < deadline:
        staged = list(tmp_path.glob(".out.building-*/layers/*.safetensors"))
        if len(staged) >= 3 or process.poll() is not None:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the build finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
