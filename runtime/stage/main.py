"""`layerline stage serve` without --package: a stage that waits to be claimed."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from layerline.errors import LayerlineError
from layerline.packager.package import LayerPackage

from ..model.layer_shape import LayerShape, LayerTiming
from .discovery import DEFAULT_CLUSTER, Announcer, check_cluster
from .frame_transport import ConnectionLimits
from .node import LoadOptions, RangeModel
from .server import is_loopback, read_token, start_stage_server

log = logging.getLogger("layerline.stage")

STOP_GRACE_S = 5.0  # control calls in flight get this long to finish after SIGTERM
ANNOUNCE_REFRESH_S = 30.0  # how often the advertised free memory is brought up to date


def load_range_model(package: LayerPackage, options: LoadOptions) -> RangeModel:
    """Load a stage's layers (imported on first Load: a waiting stage needs no mlx)."""
    from .model import load_stage_model

    return load_stage_model(package, options)


def check_exposure(listen: str, token: str | None, insecure: bool) -> None:
    """Refuse to serve beyond loopback without an auth token (unless `insecure`); warn on loopback."""
    if token is not None:
        return
    host = listen.rpartition(":")[0]
    if is_loopback(host):
        log.warning("stage=%s event=no_auth_token: any local process may claim this stage; give every "
                    "node --auth-token-file to require a shared secret", listen)
        return
    if not insecure:
        raise LayerlineError(
            f"--listen {listen} reaches beyond this machine, and without a token anyone who can reach "
            "it can claim this stage and feed it frames",
            hint="give every node the same --auth-token-file FILE, or pass --insecure on a network "
                 "you trust")
    log.warning("stage=%s event=insecure: serving without an auth token beyond loopback", listen)


def announce(endpoint: str, cluster: str, token: str | None, insecure: bool) -> Announcer:
    """Advertise the stage at `endpoint` on the LAN: on the interface its address names, or on
    every one when it listens on all of them (which check_exposure allows only with a token
    or --insecure)."""
    from ..model.host_memory import host_memory
    from ..model.weights_policy import device_kind

    return Announcer(endpoint, int(endpoint.rpartition(":")[2]), cluster=cluster, token=token,
                     wide=token is not None or insecure, device=device_kind(),
                     memory_free=lambda: host_memory().available).start()


def probe_range_layer(shape: LayerShape) -> LayerTiming:
    """Time a synthetic layer of `shape` (imported on the first probe, as the model is)."""
    from ..model.layer_probe import probe_layer

    return probe_layer(shape)


def run_stage(listen: str, cache_dir: Path, auth_token_file: Path | None, *, insecure: bool = False,
              limits: ConnectionLimits = ConnectionLimits(), activation_listen: str | None = None,
              activation_advertise: str | None = None, file_rate_limit_mb_s: float = 0.0,
              cluster: str = DEFAULT_CLUSTER, announced: bool = True) -> None:
    """Serve control and activations (advertised on the LAN if `announced`) until SIGINT or SIGTERM."""
    token = read_token(auth_token_file)
    check_cluster(cluster)
    check_exposure(listen, token, insecure)
    if activation_listen is not None:
        check_exposure(activation_listen, token, insecure)
    cache_dir.mkdir(parents=True, exist_ok=True)
    server = start_stage_server(listen, cache_dir, load_range_model, auth_token=token, limits=limits,
                                activation_listen=activation_listen,
                                activation_advertise=activation_advertise,
                                file_rate_limit_mb_s=file_rate_limit_mb_s, prober=probe_range_layer)
    node = server.node
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("stage=%s event=waiting_for_claim cache=%s", node.endpoint, cache_dir)
    print(f"stage listening on {node.endpoint}", flush=True)
    announcer = None
    if announced:
        try:
            announcer = announce(node.endpoint, cluster, token, insecure)
        except LayerlineError as exc:  # the stage serves all the same: --peer still reaches it
            log.warning("stage=%s event=announce_failed error=%s", node.endpoint, exc.message)
    while not stop.wait(ANNOUNCE_REFRESH_S):
        if announcer is not None:
            announcer.refresh()
    log.info("stage=%s event=stopping", node.endpoint)
    if announcer is not None:
        announcer.close()
    server.stop(STOP_GRACE_S)
    node.unload()
    log.info("stage=%s event=stopped", node.endpoint)
    logging.shutdown()
    sys.stdout.flush()
    # Native threads (gRPC's, mlx's) may still be alive at interpreter exit, and tearing them
    # down from static destructors aborts the process ("terminate called without an active
    # exception"); everything is stopped and flushed, so leave without running them.
    os._exit(0)
