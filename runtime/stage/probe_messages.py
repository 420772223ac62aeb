"""A layer probe on the wire: `LayerShape` and `LayerTiming` to and from their protobuf messages."""

from __future__ import annotations

from layerline.proto import stage_control_pb2 as pb

from ..model.layer_shape import DEFAULT_BATCH_ROWS, LayerShape, LayerTiming


def shape_message(shape: LayerShape) -> pb.LayerShape:
    """The Claim's probe_shape for `shape`."""
    return pb.LayerShape(hidden_size=shape.hidden_size, num_attention_heads=shape.num_attention_heads,
                         num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
                         intermediate_size=shape.intermediate_size, weight_format=shape.weight_format,
                         bits=shape.bits, group_size=shape.group_size, stored_dtype=shape.stored_dtype,
                         batch_rows=shape.batch_rows)


def shape_from_message(message: pb.LayerShape) -> LayerShape:
    """The shape a Claim asks a probe of (batch_rows 0: the default)."""
    return LayerShape(hidden_size=message.hidden_size, num_attention_heads=message.num_attention_heads,
                      num_key_value_heads=message.num_key_value_heads, head_dim=message.head_dim,
                      intermediate_size=message.intermediate_size,
                      weight_format=message.weight_format or "auto", bits=message.bits,
                      group_size=message.group_size, stored_dtype=message.stored_dtype or "float32",
                      batch_rows=message.batch_rows or DEFAULT_BATCH_ROWS)


def probe_message(timing: LayerTiming | None, memory_free: int, error: str = "") -> pb.LayerProbe:
    """ClaimAccepted's probe: the times measured (or why none were) and the memory free now."""
    if timing is None:
        return pb.LayerProbe(memory_free_bytes=memory_free, error=error or "no time measured")
    return pb.LayerProbe(one_row_us=max(1, round(timing.one_row_s * 1e6)),
                         batch_us=max(1, round(timing.batch_s * 1e6)), batch_rows=timing.batch_rows,
                         weight_format=timing.weight_format, layer_bytes=timing.layer_bytes,
                         memory_free_bytes=memory_free)


def timing_from_message(message: pb.LayerProbe) -> LayerTiming | None:
    """What a stage measured, or None when it measured nothing usable."""
    if message.error or not message.one_row_us or not message.batch_us or not message.layer_bytes:
        return None
    return LayerTiming(one_row_s=message.one_row_us / 1e6, batch_s=message.batch_us / 1e6,
                       batch_rows=message.batch_rows, weight_format=message.weight_format,
                       layer_bytes=message.layer_bytes)
