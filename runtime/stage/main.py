"""`layerline stage serve` without --package: a stage that waits to be claimed."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from layerline.packager.package import LayerPackage

from .node import LoadOptions, RangeModel
from .server import read_token, start_stage_server

log = logging.getLogger("layerline.stage")


def load_range_model(package: LayerPackage, options: LoadOptions) -> RangeModel:
    """Load a stage's layers (imported on first Load: a waiting stage needs no mlx)."""
    from .model import load_stage_model

    return load_stage_model(package, options)


def run_stage(listen: str, cache_dir: Path, auth_token_file: Path | None) -> None:
    """Serve the control and activation services until SIGINT or SIGTERM."""
    token = read_token(auth_token_file)
    cache_dir.mkdir(parents=True, exist_ok=True)
    server, node = start_stage_server(listen, cache_dir, load_range_model, auth_token=token)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("stage=%s event=waiting_for_claim cache=%s", node.endpoint, cache_dir)
    print(f"stage listening on {node.endpoint}", flush=True)
    stop.wait()
    log.info("stage=%s event=stopping", node.endpoint)
    server.stop(grace=2).wait()
