"""Stages on the LAN: a waiting stage advertises `_layerline._tcp` over mDNS (DNS-SD); stage 0
and `layerline stage list` browse for them.

An advertisement names the stage's cluster, the control protocol version, its free memory,
its device kind and a token fingerprint: an HMAC keyed by the stage's auth token over the
cluster, the addresses and the port, so that it proves the stage holds the same token
without revealing it, and a copied advertisement cannot point anywhere else. Whatever
arrives is checked here, in one place; what fails a check is ignored with a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import ifaddr
from zeroconf import (
    DNSQuestionType,
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceListener,
    Zeroconf,
)

from layerline.errors import LayerlineError

log = logging.getLogger("layerline.discovery")

SERVICE_TYPE = "_layerline._tcp.local."
PROTOCOL_VERSION = "1"  # layerline.stage.v1
DEFAULT_CLUSTER = "default"
MAX_TXT_BYTES = 512  # an advertisement's TXT record, all keys and values together
MAX_CLUSTER_CHARS = 63
MAX_DEVICE_CHARS = 16
FINGERPRINT_HEX = 32  # 128 bits of the HMAC
INFO_TIMEOUT_MS = 1000  # asking an advertised name for its records
MAX_NAMES = 256  # advertised names looked at per browse; the rest are ignored
Interfaces = InterfaceChoice | list[str]


class DiscoveryError(LayerlineError):
    """An advertisement that must not be used (another cluster, another token, malformed)."""


def check_cluster(cluster: str) -> str:
    """`cluster` if it is a usable cluster name; else a LayerlineError saying what is allowed."""
    if not 0 < len(cluster) <= MAX_CLUSTER_CHARS or not cluster.isprintable() or "=" in cluster:
        raise LayerlineError(f"cluster name {cluster[:80]!r} is not usable",
                             hint=f"use 1 to {MAX_CLUSTER_CHARS} printable characters, no '='")
    return cluster


def token_fingerprint(token: str | None, cluster: str, addresses: list[str], port: int) -> str:
    """What proves a holder of `token` advertised these addresses and port ("" without a token)."""
    if token is None:
        return ""
    message = "\n".join(["layerline-discovery-v1", cluster, ",".join(sorted(addresses)), str(port)])
    return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()[:FINGERPRINT_HEX]


@dataclass(frozen=True)
class Advertisement:
    """One stage as it advertises itself, checked."""

    name: str  # the DNS-SD instance name
    cluster: str
    version: str
    addresses: tuple[str, ...]
    port: int
    memory_free_bytes: int
    device: str
    fingerprint: str  # "" for a stage without a token

    @property
    def endpoint(self) -> str:
        """host:port of its control endpoint (its first address)."""
        return f"{self.addresses[0]}:{self.port}"

    def to_json(self) -> dict:
        return {"name": self.name, "cluster": self.cluster, "version": self.version,
                "endpoint": self.endpoint, "memory_free_bytes": self.memory_free_bytes,
                "device": self.device, "auth": "token" if self.fingerprint else "none"}


def parse_advertisement(info: ServiceInfo) -> Advertisement:
    """The advertisement `info` carries; DiscoveryError if it is malformed or oversized."""
    text = info.text or b""
    if len(text) > MAX_TXT_BYTES:
        raise DiscoveryError(f"its TXT record is {len(text)} bytes, more than {MAX_TXT_BYTES}")
    try:
        fields = {key.decode(): (value or b"").decode() for key, value in info.properties.items()}
    except UnicodeDecodeError as exc:
        raise DiscoveryError("its TXT record is not UTF-8") from exc
    missing = {"cluster", "v", "mem", "dev", "fp"} - fields.keys()
    if missing:
        raise DiscoveryError(f"its TXT record lacks {', '.join(sorted(missing))}")
    addresses = tuple(sorted(info.parsed_addresses(IPVersion.V4Only)))
    if not addresses or not info.port:
        raise DiscoveryError("it names no IPv4 address or no port")
    if not fields["mem"].isdigit() or len(fields["dev"]) > MAX_DEVICE_CHARS:
        raise DiscoveryError(f"its mem {fields['mem'][:20]!r} or dev {fields['dev'][:20]!r} is malformed")
    try:
        cluster = check_cluster(fields["cluster"])
    except LayerlineError as exc:
        raise DiscoveryError(exc.message) from exc
    return Advertisement(info.name, cluster, fields["v"], addresses, info.port, int(fields["mem"]),
                         fields["dev"], fields["fp"])


def check_usable(ad: Advertisement, cluster: str, token: str | None) -> None:
    """Raise DiscoveryError unless `ad` is of `cluster`, speaks our protocol and holds `token`."""
    if ad.cluster != cluster:
        raise DiscoveryError(f"it is of cluster {ad.cluster!r}, not {cluster!r}")
    if ad.version != PROTOCOL_VERSION:
        raise DiscoveryError(f"it speaks protocol version {ad.version[:20]!r}, not {PROTOCOL_VERSION}")
    expected = token_fingerprint(token, ad.cluster, list(ad.addresses), ad.port)
    if not hmac.compare_digest(ad.fingerprint.encode(), expected.encode()):
        raise DiscoveryError("its token fingerprint is not ours" if ad.fingerprint and token
                             else "it has a token and we have none" if ad.fingerprint
                             else "it has no token and we have one")


def interfaces_for(host: str, wide: bool) -> Interfaces:
    """Where to advertise or browse: the interface of `host` (a named address), or every
    interface when `host` is a wildcard and `wide` (a token is set, or --insecure)."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        return InterfaceChoice.All if wide else ["127.0.0.1"]
    return [_ipv4(host)]


def _ipv4(host: str) -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise LayerlineError(f"cannot resolve {host} to an IPv4 address for discovery: {exc}",
                             hint="give --listen an IPv4 address") from exc


def _zeroconf(interfaces: Interfaces) -> Zeroconf:
    try:
        return Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    except OSError as exc:
        raise LayerlineError(f"cannot start mDNS discovery on {interfaces}: {exc}",
                             hint="check that UDP port 5353 is usable, or pass --no-announce") from exc


def _host_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback left out unless it has no other."""
    found = {ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if ip.is_IPv4}
    return sorted({a for a in found if not ipaddress.IPv4Address(a).is_loopback} or {"127.0.0.1"})


class Announcer:
    """Advertises one stage on the LAN until closed; its free memory is refreshed on demand."""

    def __init__(self, listen: str, port: int, *, cluster: str, token: str | None, wide: bool,
                 device: str, memory_free: Callable[[], int]) -> None:
        host = listen.rpartition(":")[0]
        self._interfaces = interfaces_for(host, wide)
        self._zeroconf = _zeroconf(self._interfaces)
        if isinstance(self._interfaces, list):
            addresses = list(self._interfaces)
        else:
            addresses = _host_addresses()
        self.cluster, self.port, self.addresses = cluster, port, addresses
        self._fixed = {"cluster": cluster, "v": PROTOCOL_VERSION, "dev": device,
                       "fp": token_fingerprint(token, cluster, addresses, port)}
        self._memory_free = memory_free
        name = f"{socket.gethostname()[:30]}-{port}-{uuid.uuid4().hex[:6]}"
        self._name = name
        self.info = self._info()

    def _info(self) -> ServiceInfo:
        """The advertisement, with the free memory as it is now."""
        return ServiceInfo(SERVICE_TYPE, f"{self._name}.{SERVICE_TYPE}", port=self.port,
                           addresses=[socket.inet_aton(a) for a in self.addresses],
                           properties=self._properties(), server=f"{self._name}.local.")

    def _properties(self) -> dict[str, str]:
        return {**self._fixed, "mem": str(self._memory_free())}

    def start(self) -> Announcer:
        """Register the advertisement (probing that its name is unique takes about a second)."""
        try:
            self._zeroconf.register_service(self.info, allow_name_change=True, cooperating_responders=True)
        except Exception as exc:  # zeroconf's own errors (a name taken, a closed instance) and OSError
            self._zeroconf.close()
            raise LayerlineError(f"cannot advertise {self.info.name}: {type(exc).__name__}: {exc}",
                                 hint="pass --no-announce and name this stage with stage 0's --peer") from exc
        self._name = self.info.name.removesuffix(f".{SERVICE_TYPE}")  # as registered (maybe renamed)
        log.info("event=announced name=%s cluster=%s addresses=%s port=%d auth=%s", self.info.name,
                 self.cluster, ",".join(self.addresses), self.port, "token" if self._fixed["fp"] else "none")
        return self

    def refresh(self) -> None:
        """Advertise the free memory as it is now (a failure is logged: the stage serves on)."""
        info = self._info()
        try:
            self._zeroconf.update_service(info)
        except Exception as exc:  # mDNS is a convenience: it must never take the stage down
            log.warning("event=announce_refresh_failed name=%s error=%s: %s", info.name,
                        type(exc).__name__, exc)
            return
        self.info = info

    def close(self) -> None:
        """Withdraw the advertisement (a failure is logged: the stage stops all the same)."""
        try:
            self._zeroconf.unregister_service(self.info)
        except Exception as exc:
            log.warning("event=announce_withdraw_failed name=%s error=%s: %s", self.info.name,
                        type(exc).__name__, exc)
        finally:
            self._zeroconf.close()


class _Collector(ServiceListener):
    """Names seen by a browser, in the order they came."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.changed = threading.Event()

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.names.append(name)
        self.changed.set()

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        pass

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        pass


def browse(interfaces: Interfaces, seconds: float,
           take: Callable[[Advertisement], bool] = lambda ad: False) -> list[Advertisement]:
    """Every well-formed advertisement seen within `seconds`, each handed to `take` as it comes
    (browsing stops once `take` returns True); malformed ones are logged and left out."""
    zc = _zeroconf(interfaces)
    collector = _Collector()
    # QM: answers come by multicast, which reaches us on the same host too (a unicast answer to
    # port 5353 may go to another socket bound there).
    browser = ServiceBrowser(zc, SERVICE_TYPE, collector, question_type=DNSQuestionType.QM)
    found: list[Advertisement] = []
    deadline = time.monotonic() + seconds
    seen = 0
    try:
        while time.monotonic() < deadline:
            collector.changed.wait(max(0.0, deadline - time.monotonic()))
            collector.changed.clear()
            for name in collector.names[seen:MAX_NAMES]:
                seen += 1
                left_ms = (deadline - time.monotonic()) * 1000
                if left_ms <= 0:
                    break  # a flood of names must not hold browsing past its deadline
                info = ServiceInfo(SERVICE_TYPE, name)
                if not info.request(zc, min(INFO_TIMEOUT_MS, left_ms), question_type=DNSQuestionType.QM):
                    log.warning("event=discovery_ignored name=%s reason=its records did not arrive", name)
                    continue
                try:
                    ad = parse_advertisement(info)
                except DiscoveryError as exc:
                    log.warning("event=discovery_ignored name=%s reason=%s", name, exc.message)
                    continue
                found.append(ad)
                if take(ad):
                    return found
    finally:
        browser.cancel()
        zc.close()
    return found
