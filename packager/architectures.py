"""The architectures layerline can split, and what each expects of its weights.

Model definitions come from mlx-lm; this module only names them, builds their
config from GGUF metadata, and lists the tensors a layer must hold.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerline.errors import UnsupportedArchitectureError

LAYER_PREFIX = "model.layers."
EMBED_KEYS = ("model.embed_tokens.weight",)
HEAD_KEYS = ("model.norm.weight", "lm_head.weight")


@dataclass(frozen=True)
class Architecture:
    name: str  # mlx-lm model_type
    gguf_name: str  # general.architecture in GGUF files
    # llama.cpp's converter permutes Q/K rows for its rotary layout on these.
    gguf_permutes_qk: bool


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(name="llama", gguf_name="llama", gguf_permutes_qk=True),
    "qwen2": Architecture(name="qwen2", gguf_name="qwen2", gguf_permutes_qk=False),
}


def get_architecture(name: str) -> Architecture:
    """The supported architecture called `name` (mlx-lm model_type or GGUF name)."""
    for arch in ARCHITECTURES.values():
        if name in (arch.name, arch.gguf_name):
            return arch
    raise UnsupportedArchitectureError(
        f"unsupported architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}",
        hint="convert a model of a supported architecture, or add it to packager/architectures.py",
    )


def model_module(name: str) -> Any:
    """mlx-lm's module for an architecture (ModelArgs, Model)."""
    return importlib.import_module(f"mlx_lm.models.{get_architecture(name).name}")


def config_from_gguf(arch: Architecture, meta: dict[str, Any], vocab_size: int,
                     has_output: bool) -> dict[str, Any]:
    """mlx-lm ModelArgs for a GGUF file, from its `<arch>.*` metadata."""

    def key(suffix: str, default: Any = None) -> Any:
        return meta.get(f"{arch.gguf_name}.{suffix}", default)

    def f32(suffix: str, default: float) -> float:
        # GGUF stores these as float32; print them as the short decimals the model card says.
        return float(str(np.float32(key(suffix, default))))

    n_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    config: dict[str, Any] = {
        "model_type": arch.name,
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", n_heads)),
        "rms_norm_eps": f32("attention.layer_norm_rms_epsilon", 1e-5),
        "vocab_size": vocab_size,
        "max_position_embeddings": int(key("context_length", 4096)),
        "rope_theta": f32("rope.freq_base", 10000.0),
        "tie_word_embeddings": not has_output,
    }
    head_dim = key("attention.key_length") or key("rope.dimension_count")
    if arch.name == "llama" and head_dim and int(head_dim) != hidden // n_heads:
        config["head_dim"] = int(head_dim)
    scaling_type = key("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        config["rope_scaling"] = {
            "type": scaling_type,
            "factor": float(key("rope.scaling.factor", 1.0)),
        }
        original = key("rope.scaling.original_context_length")
        if original:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    return config


def layer_tensor_names(config: dict[str, Any]) -> list[str]:
    """Names (local to one layer, e.g. `self_attn.q_proj.weight`) a layer file must hold."""
    from mlx.utils import tree_flatten

    module = model_module(config["model_type"])
    args = module.ModelArgs.from_dict({**config, "num_hidden_layers": 1})
    # mlx arrays are lazy: building a one-layer model to read its names allocates nothing.
    model = module.Model(args)
    prefix = f"{LAYER_PREFIX}0."
    return [k[len(prefix):] for k, _ in tree_flatten(model.parameters()) if k.startswith(prefix)]
