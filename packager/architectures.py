"""The architectures layerline can split: a thin table over mlx-lm's models and gguf's names.

Model definitions, parameter names, `sanitize` and `make_cache` come from
mlx-lm; GGUF tensor names come from gguf's `TensorNameMap`. An `Architecture`
only records where a model really differs from that common ground: how
llama.cpp stored its weights (llama's rotary Q/K permutation, Gemma's norms
stored as 1 + w), and what the whole model does around its blocks, which stage
0 must repeat (Gemma's and Granite's embedding scale, Gemma 2's final
soft-capping, Granite's logit scaling, and Gemma 2's attention, which takes
only array masks).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerline.errors import UnsupportedArchitectureError

LAYER_PREFIX = "model.layers."
EMBED_KEYS = ("model.embed_tokens.weight",)
HEAD_KEYS = ("model.norm.weight", "lm_head.weight")

GGUFMeta = Callable[[str, Any], Any]  # key(suffix, default) -> the GGUF's `<arch>.<suffix>`
FromArgs = Callable[[Any], float]  # a number from mlx-lm's ModelArgs


def _sqrt_hidden(args: Any) -> float:
    return args.hidden_size**0.5


def _sqrt_hidden_bf16(args: Any) -> float:
    import mlx.core as mx

    # Gemma 3 rounds the scale to bf16 first, as mlx-lm does (and its checkpoints were trained).
    return mx.array(args.hidden_size**0.5, mx.bfloat16).item()


@dataclass(frozen=True)
class Architecture:
    name: str  # mlx-lm model_type
    gguf_name: str | None  # general.architecture in GGUF files; None: llama.cpp writes it as another
    # llama.cpp's converter permutes Q/K rows for its rotary layout on these.
    gguf_permutes_qk: bool = False
    # llama.cpp stores Gemma's RMSNorm weights as 1 + w (mlx-lm's Gemma norms add the 1 themselves).
    gguf_norm_offset: float = 0.0
    # What the whole model does before the first block and after the last (stage 0 repeats it):
    embed_multiplier: FromArgs | None = None  # embedding * m
    logits_softcap: FromArgs | None = None  # c * tanh(logits / c)
    logits_divisor: FromArgs | None = None  # logits / d
    array_masks: bool = False  # the block's attention needs a mask array, never the "causal" shortcut
    # mlx-lm ModelArgs fields from GGUF metadata, beyond those every architecture shares.
    gguf_config: Callable[[GGUFMeta, dict[str, Any]], dict[str, Any]] | None = None


def _head_dim(key: GGUFMeta, config: dict[str, Any]) -> dict[str, Any]:
    head_dim = key("attention.key_length", None)
    return {"head_dim": int(head_dim)} if head_dim else {}


def _llama(key: GGUFMeta, config: dict[str, Any]) -> dict[str, Any]:
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None)
    if head_dim and int(head_dim) != config["hidden_size"] // config["num_attention_heads"]:
        return {"head_dim": int(head_dim)}
    return {}


def _qwen3_moe(key: GGUFMeta, config: dict[str, Any]) -> dict[str, Any]:
    moe_ff = int(key("expert_feed_forward_length"))
    return {
        **_head_dim(key, config),
        "num_experts": int(key("expert_count")),
        "num_experts_per_tok": int(key("expert_used_count")),
        "moe_intermediate_size": moe_ff,
        "intermediate_size": int(key("feed_forward_length", moe_ff)),
        "decoder_sparse_step": 1,  # llama.cpp's qwen3moe: every block is a mixture of experts
        "mlp_only_layers": [],
        "norm_topk_prob": True,  # and it always renormalizes the top-k weights
    }


def _mixtral(key: GGUFMeta, config: dict[str, Any]) -> dict[str, Any]:
    return {**_llama(key, config), "num_local_experts": int(key("expert_count")),
            "num_experts_per_tok": int(key("expert_used_count"))}


def _granite(key: GGUFMeta, config: dict[str, Any]) -> dict[str, Any]:
    return {"embedding_multiplier": float(key("embedding_scale", 1.0)),
            "residual_multiplier": float(key("residual_scale", 1.0)),
            "attention_multiplier": float(key("attention.scale", 1.0)),
            "logits_scaling": float(key("logit_scale", 1.0)),
            "attention_bias": False, "mlp_bias": False}


def _gemma_attention_scalar(config: dict[str, Any], head_dim: int, big_layer_count: int) -> float:
    # llama.cpp hard-codes it too: the 27B models scale queries by hidden/heads, the rest by head_dim.
    if config["num_hidden_layers"] == big_layer_count:
        return float(config["hidden_size"] // config["num_attention_heads"])
    return float(head_dim)


def _gemma2(key: GGUFMeta, config: dict[str, Any]) -> dict[str, Any]:
    head_dim = int(key("attention.key_length"))
    return {
        "head_dim": head_dim,
        "attn_logit_softcapping": float(key("attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(key("final_logit_softcapping", 30.0)),
        "query_pre_attn_scalar": _gemma_attention_scalar(config, head_dim, 46),
        "tie_word_embeddings": True,
    }


def _sliding_window_pattern(value: Any, default: int) -> int:
    """mlx-lm's `sliding_window_pattern` (every Nth block is global) from GGUF's key, which is
    that N or one flag per block (true: sliding)."""
    if isinstance(value, list):
        return value.index(False) + 1 if False in value else len(value) + 1
    return int(value) if value else default


def _gemma3(key: GGUFMeta, config: dict[str, Any]) -> dict[str, Any]:
    head_dim = int(key("attention.key_length"))
    return {
        "head_dim": head_dim,
        "sliding_window": int(key("attention.sliding_window", 512)),
        # llama.cpp's gemma3: every 6th block attends globally; local blocks use RoPE base 10000.
        "sliding_window_pattern": _sliding_window_pattern(key("attention.sliding_window_pattern"), 6),
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": _gemma_attention_scalar(config, head_dim, 62),
    }


def _phi3(key: GGUFMeta, config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rotary = key("rope.dimension_count", None)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    if rotary and int(rotary) != head_dim:
        out["partial_rotary_factor"] = int(rotary) / head_dim
    original = key("rope.scaling.original_context_length", None)
    if original:
        out["original_max_position_embeddings"] = int(original)
    return out


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama", "llama", gguf_permutes_qk=True, gguf_config=_llama),
        # llama.cpp converts Mistral checkpoints to its `llama` architecture.
        Architecture("mistral", None),
        # llama.cpp writes Mixtral as `llama` too, with expert tensors (see `gguf_architecture`).
        Architecture("mixtral", None, gguf_permutes_qk=True, gguf_config=_mixtral),
        Architecture("qwen2", "qwen2"),
        Architecture("qwen3", "qwen3", gguf_config=_head_dim),
        Architecture("qwen3_moe", "qwen3moe", gguf_config=_qwen3_moe),
        Architecture("gemma2", "gemma2", gguf_norm_offset=1.0, embed_multiplier=_sqrt_hidden,
                     logits_softcap=lambda args: args.final_logit_softcapping, array_masks=True,
                     gguf_config=_gemma2),
        Architecture("gemma3_text", "gemma3", gguf_norm_offset=1.0, embed_multiplier=_sqrt_hidden_bf16,
                     gguf_config=_gemma3),
        Architecture("phi3", "phi3", gguf_config=_phi3),
        Architecture("olmo2", "olmo2"),
        Architecture("granite", "granite", gguf_permutes_qk=True,
                     embed_multiplier=lambda args: args.embedding_multiplier,
                     logits_divisor=lambda args: args.logits_scaling, gguf_config=_granite),
    )
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


def gguf_architecture(meta: dict[str, Any]) -> Architecture:
    """The architecture of a GGUF file, from `general.architecture` and, for llama.cpp's
    `llama`, whether its blocks are mixtures of experts (Mixtral)."""
    name = meta["general.architecture"]
    if name == "llama" and meta.get("llama.expert_count"):
        return ARCHITECTURES["mixtral"]
    return get_architecture(name)


def model_module(name: str) -> Any:
    """mlx-lm's module for an architecture (ModelArgs, Model), as mlx-lm's loader picks it."""
    from mlx_lm.utils import MODEL_REMAPPING

    arch = get_architecture(name).name
    return importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(arch, arch)}")


def build_model(config: dict[str, Any]) -> Any:
    """mlx-lm's whole Model for `config`. Its arrays are lazy: until evaluated or replaced by
    loaded weights they allocate nothing, so building every block to keep a few costs nothing."""
    module = model_module(config["model_type"])
    return module.Model(module.ModelArgs.from_dict(config))


def whole_model_weights(model: Any, config: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """`weights` as the whole mlx-lm `model` loads them: a tied head's `lm_head` dropped, then
    mlx-lm's own `sanitize` (e.g. Gemma 3 ties its head there)."""
    if config.get("tie_word_embeddings", True):
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
    return model.sanitize(weights) if hasattr(model, "sanitize") else weights


def config_from_gguf(arch: Architecture, meta: dict[str, Any], vocab_size: int,
                     has_output: bool) -> dict[str, Any]:
    """mlx-lm ModelArgs for a GGUF file, from its `<arch>.*` metadata."""
    prefix = meta["general.architecture"]

    def key(suffix: str, default: Any = None) -> Any:
        return meta.get(f"{prefix}.{suffix}", default)

    def f32(suffix: str, default: float) -> float:
        # GGUF stores these as float32; print them as the short decimals the model card says.
        return float(str(np.float32(key(suffix, default))))

    n_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    config: dict[str, Any] = {
        "model_type": arch.name,
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length", 0)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", n_heads)),
        "rms_norm_eps": f32("attention.layer_norm_rms_epsilon", 1e-5),
        "vocab_size": vocab_size,
        "max_position_embeddings": int(key("context_length", 4096)),
        "rope_theta": f32("rope.freq_base", 10000.0),
        "tie_word_embeddings": not has_output,
    }
    scaling_type = key("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        config["rope_scaling"] = {
            "type": scaling_type,
            "factor": float(key("rope.scaling.factor", 1.0)),
        }
        original = key("rope.scaling.original_context_length")
        if original:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    if arch.gguf_config is not None:
        config.update(arch.gguf_config(key, config))
    return config


def layer_tensor_names(model: Any, index: int) -> list[str]:
    """Names (local to block `index`, e.g. `self_attn.q_proj.weight`) its layer file must hold."""
    from mlx.utils import tree_flatten

    return [name for name, _ in tree_flatten(model.layers[index].parameters())]
