"""PackageFiles.Fetch on the fetching side: one file from another stage, resumed and verified.

The bytes go to `<cache>/blobs/<sha256>.partial` and are hashed as they arrive. A broken
stream is resumed from the partial file's size, on the next try or by the next
preparation (which hashes the bytes already on disk, but does not fetch them again).
A file that hashes wrong is fetched again from its first byte; a source that keeps
failing is given up for the next.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from layerline.errors import LayerlineError
from layerline.packager.package import HASH_CHUNK
from layerline.proto import stage_control_pb2 as pb
from layerline.proto import stage_control_pb2_grpc as pb_grpc

from .client import auth_metadata
from .content_cache import ContentCache
from .grpc_options import CLIENT_OPTIONS

log = logging.getLogger("layerline.files")

MAX_STALLS = 3  # broken streams in a row without a new byte before a source is given up
MAX_MISMATCHES = 2  # whole files from one source that hash wrong before it is given up
_GIVE_UP_AT_ONCE = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNIMPLEMENTED}


@dataclass(frozen=True)
class WantedFile:
    relative: str  # package path
    sha256: str
    size: int | None  # None: learned from the first chunk (a manifest)


class Download:
    """A partial file in the cache, its hash so far, and how many bytes came over the network."""

    def __init__(self, cache: ContentCache, want: WantedFile, on_hashed: Callable[[int], None]) -> None:
        self.want = want
        self.path = cache.partial(want.sha256)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._digest = hashlib.sha256()
        self.size = 0
        if self.path.is_file():  # an earlier transfer broke off: keep what it wrote
            with open(self.path, "rb") as f:
                while chunk := f.read(HASH_CHUNK):
                    self._digest.update(chunk)
                    self.size += len(chunk)
                    on_hashed(len(chunk))
            if want.size is not None and self.size > want.size:
                self.restart()
        self.resumed_from = self.size

    def append(self, offset: int, data: bytes) -> None:
        if offset != self.size:
            raise LayerlineError(f"{self.want.relative}: a chunk at byte {offset} arrived where byte "
                                 f"{self.size} was expected")
        with open(self.path, "ab") as f:
            f.write(data)
        self._digest.update(data)
        self.size += len(data)

    def matches(self) -> bool:
        return self._digest.hexdigest() == self.want.sha256

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)
        self._digest = hashlib.sha256()
        self.size = 0


class FileSource:
    """Another stage's PackageFiles service."""

    def __init__(self, endpoint: str, token: str | None) -> None:
        self.endpoint = endpoint
        self.name = f"stage {endpoint}"
        self._metadata = auth_metadata(token)
        self._channel = grpc.insecure_channel(endpoint, options=CLIENT_OPTIONS)
        self._stub = pb_grpc.PackageFilesStub(self._channel)

    def stream(self, manifest_sha256: str, download: Download, on_bytes: Callable[[int], None]) -> int:
        """Append the rest of the file to `download`; return its whole size. Raises grpc.RpcError
        when the stream breaks. No deadline: keepalive pings notice a dead peer."""
        want = download.want
        request = pb.FetchRequest(manifest_sha256=manifest_sha256, path=want.relative, sha256=want.sha256,
                                  offset=download.size)
        file_bytes = want.size
        for chunk in self._stub.Fetch(request, metadata=self._metadata):
            file_bytes = chunk.file_bytes
            if chunk.data:
                download.append(chunk.offset, chunk.data)
                on_bytes(len(chunk.data))
        return download.size if file_bytes is None else file_bytes

    def close(self) -> None:
        self._channel.close()


@contextmanager
def blob_lock(cache: ContentCache, sha256: str) -> Iterator[None]:
    """Hold the cache's lock on one blob: two stages sharing a cache never write one file at once."""
    path = cache.lock(sha256)
    cache.locks.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fetch_from(source: FileSource, cache: ContentCache, manifest_sha256: str, want: WantedFile, *,
               on_bytes: Callable[[int], None], on_hashed: Callable[[int], None],
               on_restart: Callable[[int], None]) -> Path:
    """Fetch `want` from one source into the cache; return the blob, or raise LayerlineError saying
    why this source could not give it. `on_bytes` counts bytes received, `on_restart` bytes
    thrown away (a file that hashed wrong)."""
    with blob_lock(cache, want.sha256):
        download = Download(cache, want, on_hashed)
        if download.resumed_from:
            log.info("event=fetch_resume path=%s from_byte=%d source=%s", want.relative,
                     download.resumed_from, source.name)
        stalls = mismatches = 0
        while True:
            before = download.size
            try:
                size = source.stream(manifest_sha256, download, on_bytes)
            except grpc.RpcError as exc:
                if exc.code() in _GIVE_UP_AT_ONCE:
                    raise LayerlineError(f"{source.name}: {exc.code().name} {exc.details()}") from exc
                stalls = 0 if download.size > before else stalls + 1
                log.warning("event=fetch_broken path=%s at_byte=%d source=%s error=%s", want.relative,
                            download.size, source.name, exc.code().name)
                if stalls >= MAX_STALLS:
                    raise LayerlineError(f"{source.name}: the transfer broke off {stalls} times at byte "
                                         f"{download.size} ({exc.code().name} {exc.details()})") from exc
                time.sleep(0.2 * 2 ** stalls)
                continue
            if download.size < size:
                stalls += 1  # the stream ended early without an error: resume like a broken one
                if stalls >= MAX_STALLS:
                    raise LayerlineError(f"{source.name}: the transfer ended at byte {download.size} of "
                                         f"{size}, {stalls} times")
                continue
            if download.matches():
                return cache.adopt(download.path, want.sha256)
            mismatches += 1
            log.warning("event=fetch_checksum_mismatch path=%s source=%s attempt=%d", want.relative,
                        source.name, mismatches)
            on_restart(download.size)
            download.restart()
            if mismatches >= MAX_MISMATCHES:
                raise LayerlineError(f"{source.name}: the file failed verification (sha256 mismatch) "
                                     f"{mismatches} times")
