"""Stage 0's `--discover`: the free stages of its cluster that hold its token, found on the LAN.

An advertisement is only a claim about a stage: each is checked (cluster, protocol version,
token fingerprint) and then asked for its Status, which only a layerline stage answers and
which says whether it is free. Anything else is ignored with a log line; nothing is claimed
here (the coordinator claims what this returns, as it does `--peer`).
"""

from __future__ import annotations

import logging
import time

from layerline.errors import StageUnavailableError
from layerline.proto import stage_control_pb2 as pb

from ..stage.client import StageClient
from ..stage.discovery import Advertisement, DiscoveryError, Interfaces, browse, check_usable

log = logging.getLogger("layerline.discovery")

STATUS_TIMEOUT_S = 1.0  # a found stage must answer Status within this


def find_peers(cluster: str, token: str | None, interfaces: Interfaces, seconds: float, *,
               want: int = 0, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Control endpoints of the free stages of `cluster` holding `token` seen within `seconds`
    (sooner once `want` are found, if above 0), in endpoint order; `exclude`d ones are skipped."""
    started = time.monotonic()
    usable: list[Advertisement] = []

    def take(ad: Advertisement) -> bool:
        if ad.endpoint in exclude or any(ad.endpoint == u.endpoint for u in usable):
            return False
        try:
            check_usable(ad, cluster, token)
            check_free(ad.endpoint, token)
        except DiscoveryError as exc:
            log.warning("event=discovery_ignored name=%s endpoint=%s reason=%s", ad.name, ad.endpoint,
                        exc.message)
            return False
        usable.append(ad)
        log.info("event=discovered name=%s endpoint=%s memory_free=%d device=%s after_s=%.2f", ad.name,
                 ad.endpoint, ad.memory_free_bytes, ad.device, time.monotonic() - started)
        return bool(want) and len(usable) >= want

    browse(interfaces, seconds, take)
    return sorted(ad.endpoint for ad in usable)


def check_free(endpoint: str, token: str | None) -> None:
    """Raise DiscoveryError unless a layerline stage answers Status at `endpoint`, unclaimed."""
    client = StageClient(endpoint, coordinator_id="", term=0, run_id="", token=token,
                         timeout_s=STATUS_TIMEOUT_S)
    try:
        status = client.status()
    except StageUnavailableError as exc:
        raise DiscoveryError(f"no layerline stage answers there ({exc.message})") from exc
    finally:
        client.close()
    if status.state != pb.STAGE_STATE_FREE:
        raise DiscoveryError(f"it is {pb.StageState.Name(status.state)}, claimed by "
                             f"{status.holder_coordinator_id or 'nobody'}")
