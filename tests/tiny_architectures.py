"""Tiny random-weight models of every supported architecture, written as llama.cpp and
Hugging Face would: a safetensors folder (config.json + tokenizer) and a GGUF file.

The weights' names and shapes come from mlx-lm's own model for the config (with a mixture's
experts unstacked, as Hugging Face stores them); the GGUF writer is the inverse of the
packager's reader, written from llama.cpp's converter: gguf's tensor names, llama's Q/K
permutation, Gemma's norms stored as 1 + w, experts stacked per block.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from layerline.packager.architectures import build_model
from layerline.runtime.bench.tiny_model import llama_config, write_hf_folder

from helpers import permute_qk

LAYERS = 4
VOCAB = 1024  # SmolLM2's first tokens: GGUF files of 49152 token strings take seconds to read
_BASE = llama_config(layers=LAYERS, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=VOCAB,
                     context=512)


def _config(model_type: str, architecture: str, **extra: Any) -> dict[str, Any]:
    return {**_BASE, "model_type": model_type, "architectures": [architecture], **extra}


# Hugging Face config.json of each architecture, as small as its mlx-lm model allows.
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _config("llama", "LlamaForCausalLM"),
    # mlx-lm reads Mistral as llama; its sliding_window applies only with `layer_types`.
    "mistral": _config("mistral", "MistralForCausalLM", sliding_window=4096),
    "mixtral": _config("mixtral", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2,
                       intermediate_size=32),
    "qwen2": _config("qwen2", "Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": _config("qwen3", "Qwen3ForCausalLM", head_dim=32, rms_norm_eps=1e-6),
    "qwen3_moe": _config("qwen3_moe", "Qwen3MoeForCausalLM", head_dim=16, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                         mlp_only_layers=[], norm_topk_prob=True, rms_norm_eps=1e-6),
    "gemma2": _config("gemma2", "Gemma2ForCausalLM", head_dim=16, query_pre_attn_scalar=16,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      tie_word_embeddings=True, rms_norm_eps=1e-6),
    # Every other block slides over 8 positions: windows are crossed within a short test.
    "gemma3_text": _config("gemma3_text", "Gemma3ForCausalLM", head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=8, sliding_window_pattern=2, rope_theta=1e6,
                           rope_local_base_freq=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "phi3": _config("phi3", "Phi3ForCausalLM", original_max_position_embeddings=512),
    "olmo2": _config("olmo2", "Olmo2ForCausalLM", rms_norm_eps=1e-6),
    "granite": _config("granite", "GraniteForCausalLM", embedding_multiplier=12.0, residual_multiplier=0.22,
                       attention_multiplier=0.0078125, logits_scaling=8.0, attention_bias=False,
                       mlp_bias=False, tie_word_embeddings=True),
}

_EXPERTS = re.compile(r"^(model\.layers\.\d+\.(?:mlp|block_sparse_moe))\.switch_mlp\.(\w+)\.weight$")
# Mixtral's checkpoints name each expert's matrices w1 (gate), w2 (down), w3 (up).
_MIXTRAL_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def random_weights(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face layout for any supported architecture."""
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    gemma = config["model_type"].startswith("gemma")
    model = build_model(config)  # lazy: only names and shapes are read
    weights: dict[str, np.ndarray] = {}
    for name, value in tree_flatten(model.parameters()):
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        shape = tuple(value.shape)
        if name.endswith("norm.weight"):  # Gemma's norms scale by 1 + w, the others by w
            values = (0.0 if gemma else 1.0) + 0.1 * rng.standard_normal(shape)
        else:
            values = 0.05 * rng.standard_normal(shape)
        values = values.astype(np.float32)
        experts = _EXPERTS.match(name)
        if experts:  # Hugging Face stores each expert apart; mlx-lm's sanitize stacks them
            matrix = experts[2]
            if experts[1].endswith("block_sparse_moe"):
                matrix = _MIXTRAL_EXPERT_NAMES[matrix]
            for e in range(shape[0]):
                weights[f"{experts[1]}.experts.{e}.{matrix}.weight"] = values[e]
        else:
            weights[name] = values
    return weights


def write_safetensors_model(folder: Path, config: dict[str, Any], weights: dict[str, np.ndarray],
                            tokenizer_dir: Path) -> Path:
    return write_hf_folder(folder, config, weights, tokenizer_dir)


# GGUF general.architecture and gguf MODEL_ARCH of each; llama.cpp writes Mistral as llama.
_GGUF_ARCH = {"llama": "LLAMA", "mistral": "LLAMA", "mixtral": "LLAMA", "qwen2": "QWEN2",
              "qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE", "gemma2": "GEMMA2", "gemma3_text": "GEMMA3",
              "phi3": "PHI3", "olmo2": "OLMO2", "granite": "GRANITE"}


def write_gguf_model(path: Path, config: dict[str, Any], weights: dict[str, np.ndarray],
                     tokenizer: dict[str, Any], quantize_as: str | None = None) -> Path:
    """The model as llama.cpp's convert_hf_to_gguf.py writes it, in F32, or with its matrices
    (expert stacks too) in the GGUF type `quantize_as` (e.g. "Q8_0")."""
    import gguf
    from gguf.quants import quantize

    model_type = config["model_type"]
    arch = getattr(gguf.MODEL_ARCH, _GGUF_ARCH[model_type])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    if model_type in ("qwen3", "qwen3_moe", "gemma2", "gemma3_text"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if model_type == "qwen3_moe":
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if model_type == "mixtral":
        writer.add_expert_count(config["num_local_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
    if model_type == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if model_type == "gemma3_text":
        writer.add_sliding_window(config["sliding_window"])
        pattern = config["sliding_window_pattern"]  # llama.cpp assumes 6; ours has 4 blocks
        writer.add_sliding_window_pattern(
            [(i + 1) % pattern != 0 for i in range(config["num_hidden_layers"])])
    if model_type == "granite":
        writer.add_embedding_scale(config["embedding_multiplier"])
        writer.add_residual_scale(config["residual_multiplier"])
        writer.add_attention_scale(config["attention_multiplier"])
        writer.add_logit_scale(config["logits_scaling"])
    if model_type == "phi3":
        writer.add_rope_scaling_orig_ctx_len(config["original_max_position_embeddings"])
    _add_tokenizer(writer, tokenizer)

    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for hf_name, values in _stack_experts(weights).items():
        base, _, suffix = hf_name.rpartition(".")
        permutes = arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.GRANITE)
        if permutes and base.endswith("q_proj"):
            values = permute_qk(values, heads)
        elif permutes and base.endswith("k_proj"):
            values = permute_qk(values, kv_heads)
        elif model_type.startswith("gemma") and hf_name.endswith("norm.weight"):
            values = values + np.float32(1.0)
        name = f"{names.get_name(base)}.{suffix}"
        if quantize_as and values.ndim >= 2 and values.shape[-1] % 32 == 0:
            kind = gguf.GGMLQuantizationType[quantize_as]
            writer.add_tensor(name, quantize(np.ascontiguousarray(values), kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _stack_experts(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`mlp.experts.E.gate_proj.weight` -> one `mlp.experts.gate_proj.weight` (E, out, in)
    (Mixtral's `block_sparse_moe.experts.E.w1.weight` alike)."""
    out: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, values in weights.items():
        match = re.match(r"^(.*\.(?:mlp|block_sparse_moe)\.experts)\.(\d+)\.(\w+\.weight)$", name)
        if match:
            stacks.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = values
        else:
            out[name] = values
    for name, experts in stacks.items():
        out[name] = np.stack([experts[e] for e in sorted(experts)])
    return out


def small_tokenizer(tokenizer_gguf: Path, vocab: int = VOCAB) -> dict[str, Any]:
    """SmolLM2's byte-level BPE cut to its first `vocab` tokens and the merges that make them,
    as GGUF tokenizer fields: a real tokenizer, small enough to read fast."""
    import gguf

    f = gguf.GGUFReader(str(tokenizer_gguf)).fields
    tokens = f["tokenizer.ggml.tokens"].contents()[:vocab]
    kept = set(tokens)
    merges = [m for m in f["tokenizer.ggml.merges"].contents()
              if m.replace(" ", "", 1) in kept and all(part in kept for part in m.split(" ", 1))]
    return {"tokens": tokens, "token_types": f["tokenizer.ggml.token_type"].contents()[:vocab],
            "merges": merges, "bos": f["tokenizer.ggml.bos_token_id"].contents(),
            "eos": f["tokenizer.ggml.eos_token_id"].contents(),
            "chat_template": f["tokenizer.chat_template"].contents()}


def small_tokenizer_dir(out: Path, fields: dict[str, Any]) -> Path:
    """The small tokenizer as Hugging Face files, as a package built from its GGUF holds it."""
    from layerline.packager.tokenizer import save_tokenizer, tokenizer_from_gguf

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": fields["tokens"], "tokenizer.ggml.token_type": fields["token_types"],
            "tokenizer.ggml.merges": fields["merges"], "tokenizer.ggml.bos_token_id": fields["bos"],
            "tokenizer.ggml.eos_token_id": fields["eos"], "tokenizer.chat_template": fields["chat_template"]}
    save_tokenizer(tokenizer_from_gguf(meta, "llama", 512), out)
    return out


def _add_tokenizer(writer: Any, fields: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["token_types"])
    writer.add_token_merges(fields["merges"])
    writer.add_bos_token_id(fields["bos"])
    writer.add_eos_token_id(fields["eos"])
    writer.add_chat_template(fields["chat_template"])
