"""Reading a Hugging Face model folder (config.json, *.safetensors, tokenizer) as a source."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from layerline.errors import SourceError

from .architectures import build_model, get_architecture, layer_tensor_names, model_module
from .source import ModelSource


def mlx_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields of a config.json that mlx-lm's ModelArgs for its architecture knows."""
    module = model_module(raw["model_type"])
    fields = {f.name: f for f in dataclasses.fields(module.ModelArgs)}
    config = {k: v for k, v in raw.items() if k in fields}
    if "tie_word_embeddings" not in config:
        # Unsaid, it is what the architecture's own config defaults to (Phi-3: untied), else tied.
        tie = fields.get("tie_word_embeddings")
        config["tie_word_embeddings"] = (raw.get("tie_word_embeddings", True) if tie is None
                                         or tie.default is dataclasses.MISSING else tie.default)
    layer_types = raw.get("layer_types")
    if "sliding_window_pattern" in fields and "sliding_window_pattern" not in raw and layer_types:
        # Newer Gemma 3 configs say which blocks attend globally by `layer_types` alone.
        config["sliding_window_pattern"] = layer_types.index("full_attention") + 1
    return config


class SafetensorsSource(ModelSource):
    """A folder as `save_pretrained` writes it, with float (f32/f16/bf16) weights."""

    kind = "safetensors"

    def __init__(self, folder: Path) -> None:
        import mlx.core as mx

        self.folder = Path(folder)
        try:
            raw = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SourceError(f"{self.folder}/config.json is unreadable: {exc}") from exc
        if "model_type" not in raw:
            raise SourceError(f"{self.folder}/config.json has no model_type")
        if "text_config" in raw:
            raise SourceError(
                f"{self.folder} is a multimodal checkpoint ({raw['model_type']}); layer packages "
                "hold text models",
                hint="build from the model's GGUF (its text weights), or from a text-only checkpoint")
        raw = {**raw, "model_type": get_architecture(raw["model_type"]).name}
        if raw.get("quantization") or raw.get("quantization_config"):
            raise SourceError(
                f"{self.folder} holds quantized weights",
                hint="build from the original float checkpoint or from a GGUF file",
            )
        self._raw_config = raw
        self.config = mlx_config(raw)
        self.num_layers = int(self.config["num_hidden_layers"])
        self._files = sorted(self.folder.glob("*.safetensors"))
        if not self._files:
            raise SourceError(f"{self.folder} has no *.safetensors files")
        self._weights: dict[str, Any] = {}
        for file in self._files:
            try:
                self._weights.update(mx.load(str(file)))
            except Exception as exc:  # mlx raises RuntimeError/ValueError on bad files
                raise SourceError(
                    f"{file} is not a readable safetensors file: {exc}",
                    hint="the file is corrupt or truncated; download it again",
                ) from exc
        # mlx-lm's own renames (e.g. stacking a mixture's experts), on lazy arrays: nothing is read yet.
        skeleton = build_model(self.config)
        self._weights = skeleton.sanitize(self._weights) if hasattr(skeleton, "sanitize") else self._weights
        self._layer_names = [layer_tensor_names(skeleton, i) for i in range(self.num_layers)]

    @property
    def model_id(self) -> str:
        name = self._raw_config.get("_name_or_path")
        return name if isinstance(name, str) and name else self.folder.name

    def tensor(self, name: str) -> np.ndarray:
        import mlx.core as mx

        if name not in self._weights:
            raise SourceError(f"{self.folder} lacks tensor {name}")
        return np.array(self._weights[name].astype(mx.float32))

    def layer_tensor_names(self, index: int) -> list[str]:
        return self._layer_names[index]

    def tokenizer(self) -> Any:
        from .tokenizer import tokenizer_from_folder

        return tokenizer_from_folder(self.folder)

    def source_files(self) -> list[Path]:
        return [self.folder / "config.json", *self._files]
