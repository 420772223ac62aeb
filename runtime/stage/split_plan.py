"""Which stage runs which layers: planned from free memory, or given as `0:10,10:30`."""

from __future__ import annotations

from layerline.errors import LayerlineError

# Stage 0 also holds the embedding, the head, the draft model and the HTTP frontend.
STAGE0_SHARE = 0.5


def parse_split(text: str, num_layers: int) -> list[tuple[int, int]]:
    """Ranges from `a:b,b:c,...`, which must cover 0..num_layers contiguously."""
    ranges = []
    try:
        for part in text.split(","):
            start, end = part.strip().split(":")
            ranges.append((int(start), int(end)))
    except ValueError as exc:
        raise LayerlineError(f"cannot read split {text!r}", hint="write it as 0:10,10:20,20:30") from exc
    check_split(ranges, num_layers)
    return ranges


def check_split(ranges: list[tuple[int, int]], num_layers: int) -> None:
    """Raise unless the ranges are non-empty and cover [0, num_layers) in order, without gaps."""
    expected = 0
    for start, end in ranges:
        if start != expected or end <= start:
            raise LayerlineError(
                f"split {ranges} must cover layers 0..{num_layers} in order, without gaps or empty ranges",
                hint=f"for example 0:{num_layers // 2},{num_layers // 2}:{num_layers}")
        expected = end
    if expected != num_layers:
        raise LayerlineError(f"split {ranges} ends at layer {expected}, but the model has {num_layers}",
                             hint=f"make the last range end at {num_layers}")


def plan_split(num_layers: int, free_memory: list[int], stage0_share: float = STAGE0_SHARE
               ) -> list[tuple[int, int]]:
    """Layers in proportion to each stage's free memory (stage 0 weighted down), at least one each."""
    stages = len(free_memory)
    if stages > num_layers:
        raise LayerlineError(f"{stages} stages cannot split {num_layers} layers",
                             hint="use fewer peers")
    weights = [max(float(m), 1.0) for m in free_memory]
    weights[0] *= stage0_share
    total = sum(weights)
    spare = num_layers - stages  # one layer each is given first
    shares = [w / total * spare for w in weights]
    counts = [1 + int(s) for s in shares]
    # Largest remainders take the layers the floor left over.
    order = sorted(range(stages), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    for i in order[: num_layers - sum(counts)]:
        counts[i] += 1
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges
