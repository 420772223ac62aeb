"""A sha256 as layerline names files by it: 64 lowercase hex digits, checked at every edge.

Manifests, Claims, Fetch requests and the content cache turn a sha256 into a path
(`blobs/<sha256>`, `locks/<sha256>`, `packages/<sha256>/`): anything else ("../x", a slash, an
empty string) would name a file outside the cache.
"""

from __future__ import annotations

import re

_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: object) -> bool:
    """Whether `value` is a sha256 in hex: exactly 64 lowercase hex digits."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None
