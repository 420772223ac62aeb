"""Reading a GGUF file as a model source: config, tokenizer, and float tensors in HF layout."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from layerline.errors import SourceError

from .architectures import (
    LAYER_PREFIX,
    Architecture,
    build_model,
    config_from_gguf,
    gguf_architecture,
    layer_tensor_names,
)
from .gguf_blocks import HeldTensor, hold
from .source import ModelSource

GGUF_MAGIC = b"GGUF"
_QUANT_SUFFIX = re.compile(r"[.-](I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)
# mlx-lm names that gguf's TensorNameMap knows by their Hugging Face spelling: mlx-lm stacks
# the experts of a mixture-of-experts block (`switch_mlp`), as llama.cpp does (`ffn_*_exps`).
_HF_SPELLING = (("mlp.switch_mlp.", "mlp.experts."), ("block_sparse_moe.switch_mlp.", "mlp.experts."))


def _read_meta(reader: Any) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def unpermute_qk(weight: np.ndarray | HeldTensor, n_heads: int) -> np.ndarray | HeldTensor:
    """Undo llama.cpp's rotary permutation of a Q or K weight (rows grouped by head)."""
    if isinstance(weight, HeldTensor):  # packed rows move with their scales and biases
        return weight.map_rows(lambda rows: unpermute_qk(rows, n_heads))
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


class GGUFSource(ModelSource):
    """A GGUF file of a supported architecture, any quantization gguf can dequantize."""

    kind = "gguf"
    holds_quantized_blocks = True

    def __init__(self, path: Path) -> None:
        from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map

        self.path = Path(path)
        _check_gguf_file(self.path)
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as exc:  # gguf raises ValueError/struct.error/IndexError on bad data
            raise SourceError(
                f"{self.path} could not be read as GGUF: {exc}",
                hint="the file is corrupt or truncated; download it again",
            ) from exc
        self.meta = _read_meta(self.reader)
        arch_name = self.meta.get("general.architecture")
        if not isinstance(arch_name, str):
            raise SourceError(f"{self.path} has no general.architecture; not a model GGUF")
        self.arch: Architecture = gguf_architecture(self.meta)
        self.tensors = {t.name: t for t in self.reader.tensors}
        _check_complete(self.path, self.reader)

        tokens = self.meta.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens) if tokens else int(self.meta.get(f"{arch_name}.vocab_size", 0))
        embed = self.tensors.get("token_embd.weight")
        if embed is not None:
            vocab_size = int(embed.shape[-1])
        self.config = config_from_gguf(
            self.arch, self.meta, vocab_size, has_output="output.weight" in self.tensors
        )
        self.num_layers = self.config["num_hidden_layers"]

        # HF name -> GGUF name, from gguf's own table, for every tensor mlx-lm expects.
        arch_enum = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch_name)
        self._names = get_tensor_name_map(arch_enum, self.num_layers)
        skeleton = build_model(self.config)
        self._layer_names = [layer_tensor_names(skeleton, i) for i in range(self.num_layers)]
        self._check_tensors()
        self._held_group_size: int | None = None  # set while quantized_blocks() is open

    @property
    def model_id(self) -> str:
        # The file name says it best ("SmolLM2-135M-Instruct.Q4_1.gguf"), less the quant tag.
        name = _QUANT_SUFFIX.sub("", self.path.stem)
        org = self.meta.get("general.organization")
        return f"{org}/{name}" if isinstance(org, str) and org else name

    def _gguf_name(self, hf_name: str) -> str:
        base, _, suffix = hf_name.rpartition(".")
        for mlx_part, hf_part in _HF_SPELLING:
            base = base.replace(mlx_part, hf_part)
        mapped = self._names.get_name(base)
        if mapped is None:
            raise SourceError(f"{self.path}: no GGUF name for tensor {hf_name}")
        return f"{mapped}.{suffix}"

    def _expected_names(self) -> list[str]:
        names = list(self.embed_names())
        for index, layer in enumerate(self._layer_names):
            names += [f"{LAYER_PREFIX}{index}.{n}" for n in layer]
        return names + list(self.head_names())

    def _check_tensors(self) -> None:
        """Refuse a file that lacks a tensor its declared architecture needs, naming the first."""
        for hf_name in self._expected_names():
            gguf_name = self._gguf_name(hf_name)
            if gguf_name not in self.tensors:
                raise SourceError(
                    f"{self.path} declares architecture {self.meta['general.architecture']!r} but "
                    f"lacks its tensor {gguf_name} ({hf_name})",
                    hint="the file is incomplete, or its general.architecture does not match its "
                    "tensors; convert it again with llama.cpp",
                )

    @contextmanager
    def quantized_blocks(self, group_size: int) -> Iterator[None]:
        self._held_group_size = group_size
        try:
            yield
        finally:
            self._held_group_size = None

    def tensor(self, hf_name: str) -> np.ndarray | HeldTensor:  # type: ignore[override]
        from gguf.quants import dequantize

        gguf_name = self._gguf_name(hf_name)
        tensor = self.tensors.get(gguf_name)
        if tensor is None:
            raise SourceError(
                f"{self.path} lacks tensor {gguf_name} ({hf_name})",
                hint="the file is incomplete or of another architecture variant",
            )
        if self._held_group_size is not None:
            held = hold(tensor, f"{gguf_name} of {self.path.name}", self._held_group_size)
            return self._as_stored_by_hf(hf_name, held)
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise SourceError(
                f"{self.path}: tensor {gguf_name} uses {tensor.tensor_type.name}, which gguf "
                "cannot dequantize",
                hint="convert the model with a common quantization (Q4_K, Q6_K, Q8_0, F16 ...)",
            ) from exc
        return self._as_stored_by_hf(hf_name, np.asarray(values, dtype=np.float32))

    def _as_stored_by_hf(self, hf_name: str, values: np.ndarray | HeldTensor) -> np.ndarray | HeldTensor:
        """Undo what llama.cpp's converter did to this architecture's tensor."""
        if self.arch.gguf_permutes_qk and hf_name.endswith(("self_attn.q_proj.weight",
                                                            "self_attn.q_proj.bias")):
            return unpermute_qk(values, self.config["num_attention_heads"])
        if self.arch.gguf_permutes_qk and hf_name.endswith(("self_attn.k_proj.weight",
                                                            "self_attn.k_proj.bias")):
            return unpermute_qk(values, self.config["num_key_value_heads"])
        if self.arch.gguf_norm_offset and hf_name.endswith("norm.weight"):
            return values - np.float32(self.arch.gguf_norm_offset)
        return values

    def layer_tensor_names(self, index: int) -> list[str]:
        return self._layer_names[index]

    def tokenizer(self) -> Any:
        from .tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(
            self.meta, self.meta["general.architecture"], self.config["max_position_embeddings"]
        )

    def source_files(self) -> list[Path]:
        return [self.path]


def _check_gguf_file(path: Path) -> None:
    if not path.exists():
        raise SourceError(f"{path} does not exist", hint="check the path to the GGUF file")
    if not path.is_file():
        raise SourceError(f"{path} is not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SourceError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})",
            hint="pass a .gguf file, a Hugging Face safetensors folder, or a Hub repo id",
        )


def _check_complete(path: Path, reader: Any) -> None:
    """Refuse a file whose tensor data runs past its end (a truncated download)."""
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise SourceError(
                f"{path} is truncated: tensor {tensor.name} ends at byte {end} but the file "
                f"has {size} bytes",
                hint="download the file again",
            )

