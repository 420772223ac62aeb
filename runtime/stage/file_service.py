"""PackageFiles.Fetch on the serving side: a stage hands other stages the files it holds verified.

A file is found by its sha256: in a package folder this stage serves (stage 0's, or the
local folder a peer prepared from), or in its content cache. A package-folder file it
has not verified yet is hashed once before its first byte goes out, so a stage never
passes on a corrupt file. Every stream shares one byte-rate limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from layerline.errors import LayerlineError
from layerline.packager.digest import is_sha256
from layerline.packager.manifest import MANIFEST_NAME
from layerline.packager.package import LayerPackage
from layerline.proto import stage_control_pb2 as pb
from layerline.proto import stage_control_pb2_grpc as pb_grpc

from .content_cache import ContentCache

log = logging.getLogger("layerline.files")

CHUNK_BYTES = 256 << 10


class RateLimit:
    """A token bucket of `bytes_per_s` shared by every caller; 0 means no limit."""

    def __init__(self, bytes_per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = bytes_per_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next_free = clock()  # when the bytes already granted have drained

    def take(self, n: int) -> None:
        """Block until `n` more bytes fit under the rate."""
        if self.rate <= 0:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next_free)
            self._next_free = start + n / self.rate
        if start > now:
            time.sleep(start - now)


class FileIndex:
    """Where this stage holds each file it may serve."""

    def __init__(self, cache: ContentCache) -> None:
        self.cache = cache
        self._packages: dict[str, LayerPackage] = {}  # manifest sha256 → a package folder served
        self._lock = threading.Lock()

    def serve_package(self, manifest_sha256: str, package: LayerPackage) -> None:
        with self._lock:
            self._packages[manifest_sha256] = package

    def find(self, manifest_sha256: str, relative: str, sha256: str) -> Path | None:
        """The verified file for this request, or None when this stage holds none."""
        with self._lock:
            package = self._packages.get(manifest_sha256)
        if package is not None:
            path = self._in_package(package, manifest_sha256, relative, sha256)
            if path is not None:
                return path
        blob = self.cache.blob(sha256)
        return blob if blob.is_file() and self.cache.on_record(blob, sha256) else None

    def _in_package(self, package: LayerPackage, manifest_sha256: str, relative: str,
                    sha256: str) -> Path | None:
        if relative == MANIFEST_NAME:
            expected, path = manifest_sha256, package.root / MANIFEST_NAME
        else:
            try:
                entry = package.manifest.file(relative)
                path = package.path(relative)
            except LayerlineError:
                return None
            expected = entry.sha256
        if expected != sha256:
            return None
        size = path.stat().st_size if path.is_file() else -1
        return path if self.cache.check(path, sha256, size, lambda n: None) else None


class PackageFilesServicer(pb_grpc.PackageFilesServicer):
    def __init__(self, index: FileIndex, limit: RateLimit, name: str) -> None:
        self.index, self.limit, self.name = index, limit, name

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.FileChunk]:  # noqa: N802
        if not (is_sha256(request.sha256) and is_sha256(request.manifest_sha256)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "Fetch needs manifest_sha256 and sha256 as 64 lowercase hex digits")
        path = self.index.find(request.manifest_sha256, request.path, request.sha256)
        if path is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"stage {self.name} holds no verified {request.path} with sha256 {request.sha256}")
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if request.offset > size:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"offset {request.offset} is beyond the end of {request.path} ({size} bytes)")
            log.info("stage=%s event=serving_file path=%s offset=%d bytes=%d peer=%s", self.name,
                     request.path, request.offset, size - request.offset, context.peer())
            offset = f.seek(request.offset)
            if offset == size:
                yield pb.FileChunk(offset=offset, data=b"", file_bytes=size)
                return
            while offset < size and context.is_active():
                data = f.read(CHUNK_BYTES)
                if not data:
                    break
                self.limit.take(len(data))
                yield pb.FileChunk(offset=offset, data=data, file_bytes=size)
                offset += len(data)
