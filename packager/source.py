"""What every model source gives the builder, and how a SOURCE argument picks one."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from layerline.errors import SourceError

from .architectures import EMBED_KEYS, HEAD_KEYS, LAYER_PREFIX

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?(:[\w./-]+)?$")


def is_hub_id(reference: str) -> bool:
    """Whether `reference` reads as a Hub repo id (`org/name[@revision][:QUANT]`), not a local path."""
    return bool(_HUB_ID.match(reference)) and not reference.startswith((".", "/", "~"))


class ModelSource(ABC):
    """A model as float32 tensors in Hugging Face layout, layer by layer."""

    kind: str
    config: dict[str, Any]
    num_layers: int
    hub_repo: str | None = None  # set when the source was downloaded from the Hub
    holds_quantized_blocks = False  # whether `quantized_blocks` can keep them (GGUF files)

    @property
    @abstractmethod
    def model_id(self) -> str:
        """A human id for the model, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`."""

    @abstractmethod
    def tensor(self, name: str) -> np.ndarray:
        """One tensor by its Hugging Face name (`model.layers.3.mlp.up_proj.weight`), float32."""

    @contextmanager
    def quantized_blocks(self, group_size: int) -> Iterator[None]:
        """While open, `tensor` gives quantized tensors in mlx's affine format as stored
        (gguf_blocks.HeldTensor), re-quantizing with `group_size` only what mlx cannot hold."""
        raise SourceError(f"{self.source_name} is a {self.kind} source, which holds no quantized blocks")
        yield

    @abstractmethod
    def layer_tensor_names(self, index: int) -> list[str]:
        """The names layer `index` holds, locally (`self_attn.q_proj.weight`), as mlx-lm's block
        has them (blocks of one model may differ, e.g. dense blocks among mixture-of-experts ones)."""

    def layer_tensors(self, index: int) -> dict[str, np.ndarray]:
        """Tensors of layer `index`, named locally (`self_attn.q_proj.weight`)."""
        return {n: self.tensor(f"{LAYER_PREFIX}{index}.{n}") for n in self.layer_tensor_names(index)}

    def embed_names(self) -> tuple[str, ...]:
        return EMBED_KEYS

    def head_names(self) -> tuple[str, ...]:
        """`model.norm.weight`, and `lm_head.weight` unless tied to the embedding."""
        return HEAD_KEYS if not self.config.get("tie_word_embeddings", True) else HEAD_KEYS[:1]

    def embed_tensors(self) -> dict[str, np.ndarray]:
        """`model.embed_tokens.weight`."""
        return {n: self.tensor(n) for n in self.embed_names()}

    def head_tensors(self) -> dict[str, np.ndarray]:
        """`model.norm.weight`, and `lm_head.weight` unless tied to the embedding."""
        return {n: self.tensor(n) for n in self.head_names()}

    @abstractmethod
    def tokenizer(self) -> Any:
        """A transformers fast tokenizer, chat template included."""

    @abstractmethod
    def source_files(self) -> list[Path]:
        """The files whose bytes identify the source (hashed into the manifest)."""

    @property
    def source_name(self) -> str:
        files = self.source_files()
        return files[0].name if len(files) == 1 else files[0].parent.name


def open_source(source: str, *, cache_dir: Path | None = None) -> ModelSource:
    """Open SOURCE: a GGUF file, a safetensors folder, or a Hub repo id (`org/name[:QUANT]`)."""
    from .gguf_source import GGUFSource
    from .safetensors_source import SafetensorsSource

    path = Path(source).expanduser()
    if path.is_file():
        return GGUFSource(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return SafetensorsSource(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return GGUFSource(ggufs[0])
        raise SourceError(
            f"{path} is neither a Hugging Face model folder (no config.json) nor a folder with "
            f"one .gguf file (found {len(ggufs)})",
            hint="pass the .gguf file itself, or a folder with config.json and *.safetensors",
        )
    if is_hub_id(source):
        from .hub_source import download_hub_source

        local = download_hub_source(source, cache_dir=cache_dir)
        opened = open_source(str(local))
        opened.kind = "hub"
        opened.hub_repo = source
        return opened
    raise SourceError(
        f"{source} does not exist",
        hint="pass a path to a .gguf file or a safetensors folder, or a Hub repo id ORG/NAME",
    )
