"""The shape of one transformer layer, and what a probe measured of it (`layer_probe.py`).

Plain data, without mlx: a waiting stage and stage 0's planner use it before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerline.errors import LayerlineError
from layerline.packager.manifest import Manifest

DEFAULT_BATCH_ROWS = 16  # a prefill chunk's worth, or several sessions' decode rows
MAX_WIDTH = 65536  # hidden or MLP width: anything wider is not a model a stage serves


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one layer of a model, and the weight format asked for and stored."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    weight_format: str = "auto"
    bits: int = 0  # packed bits per weight as stored; 0: stored as floats
    group_size: int = 0
    stored_dtype: str = "float32"
    batch_rows: int = DEFAULT_BATCH_ROWS

    @classmethod
    def of(cls, manifest: Manifest, weight_format: str) -> LayerShape:
        """The shape of the package's layers, with the format they are to be loaded in."""
        config = manifest.config
        missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size")
                   if not config.get(k)]
        if missing:
            raise LayerlineError(f"the model's config has no {', '.join(missing)}: its layers cannot be "
                                 "probed", hint="the split is planned from free memory instead")
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        quantization = manifest.quantization
        return cls(hidden_size=hidden, num_attention_heads=heads,
                   num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(config.get("head_dim") or hidden // heads),
                   intermediate_size=int(config["intermediate_size"]), weight_format=weight_format,
                   bits=quantization.bits if quantization else 0,
                   group_size=quantization.group_size if quantization else 0,
                   stored_dtype=manifest.dtype)

    def weights(self) -> int:
        """Weights in one layer's matrices (attention projections and the gated MLP)."""
        attention = self.hidden_size * self.head_dim * (2 * self.num_attention_heads
                                                        + 2 * self.num_key_value_heads)
        return attention + 3 * self.hidden_size * self.intermediate_size

    def kv_bytes_per_position(self, dtype_bytes: int = 4) -> int:
        """Bytes one position of one session takes in one layer's KV cache."""
        return 2 * self.num_key_value_heads * self.head_dim * dtype_bytes

    def check(self) -> None:
        """Raise unless the sizes make a layer this module can build."""
        sizes = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim,
                 self.intermediate_size)
        if min(sizes) < 1 or max(sizes) > MAX_WIDTH or self.num_attention_heads % self.num_key_value_heads:
            raise LayerlineError(f"cannot probe a layer of shape {self}",
                                 hint="sizes are 1..65536 and the heads a multiple of the key/value heads")
        if self.bits and (self.bits not in (2, 3, 4, 5, 6, 8) or self.group_size not in (32, 64, 128)):
            raise LayerlineError(f"cannot probe {self.bits}-bit weights in groups of {self.group_size}",
                                 hint="bits are 2, 3, 4, 5, 6 or 8; groups 32, 64 or 128")
        if not 1 <= self.batch_rows <= 512:
            raise LayerlineError(f"cannot probe a batch of {self.batch_rows} rows", hint="ask for 1..512")


@dataclass(frozen=True)
class LayerTiming:
    """What a probe measured of one layer on one device."""

    one_row_s: float
    batch_s: float
    batch_rows: int
    weight_format: str
    layer_bytes: int

    @property
    def layer_s(self) -> float:
        """The time per layer a split is planned by: one decode row and one batch, equally weighed
        (a pipeline's passes are both)."""
        return self.one_row_s + self.batch_s
