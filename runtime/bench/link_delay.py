"""Give every link of a stage chain D ms of one-way delay: netem where the kernel has it, else proxies.

Stage 0 talks to stage 1, and stage i forwards activations to stage i+1 at the
address stage 0 was given for it (the coordinator hands each stage its
downstream peer's endpoint). So the address stage 0 gets for stage i decides
the path of the link into stage i:

- **netem**: stage i (i >= 1) runs in its own network namespace, joined to the
  namespace of stage i-1 (stage 0 stays in the host's) by a veth pair with
  `tc netem delay D` on both ends; stage 0 gets the stage's veth address.
- **proxy**: every stage listens on loopback, and stage 0 gets the address of a
  delaying TCP proxy (`delay_proxy.py`) in front of each stage, run in this
  process. Kernels without the netem qdisc (`tc` answers "Specified qdisc kind
  is unknown") get this.
- **loopback**: no delay asked, nothing in between.

`open_links` tries netem, falls back to the proxies and says why; `traffic()`
reports what crossed each link, so a benchmark can prove the delay was applied.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Protocol

from layerline.errors import LayerlineError

from .delay_proxy import DelayProxy
from .processes import free_port

log = logging.getLogger("layerline.link_delay")

LINK_METHODS = ("auto", "netem", "proxy")
_SUBNET = "10.231"  # stage i's link: 10.231.i.1 (upstream side), 10.231.i.2 (stage i)


class LinkSetupError(LayerlineError):
    """Delayed links could not be set up the way that was asked."""


class StageLinks(Protocol):
    """Where each stage listens, what stage 0 is told, and how each stage's process is started."""

    method: str  # "loopback" | "netem" | "proxy"
    delay_ms: float
    note: str  # why this method was used

    def listen(self, stage: int) -> str: ...
    def peer(self, stage: int) -> str: ...
    def command(self, stage: int, argv: list[str]) -> list[str]: ...
    def traffic(self) -> list[dict]: ...
    def close(self) -> None: ...


@dataclass
class LoopbackLinks:
    """Stages on loopback with nothing in between."""

    peers: int
    method: str = "loopback"
    delay_ms: float = 0.0
    note: str = "no delay asked"
    ports: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ports = [free_port() for _ in range(self.peers)]

    def listen(self, stage: int) -> str:
        return f"127.0.0.1:{self.ports[stage - 1]}"

    def peer(self, stage: int) -> str:
        return self.listen(stage)

    def command(self, stage: int, argv: list[str]) -> list[str]:
        return argv

    def traffic(self) -> list[dict]:
        return [{"link": f"{i - 1}->{i}", "method": self.method} for i in range(1, self.peers + 1)]

    def close(self) -> None:
        pass


class ProxyLinks:
    """Delaying TCP proxies in front of every stage but stage 0, on loopback: one before its
    control port, one before its activation port (which it advertises as the proxy's)."""

    method = "proxy"

    def __init__(self, peers: int, delay_ms: float, note: str = "") -> None:
        self.delay_ms = delay_ms
        self.note = note or "asked for"
        self.ports = [free_port() for _ in range(peers)]
        self.activation_ports = [free_port() for _ in range(peers)]
        self.proxies: list[DelayProxy] = []
        self.activation_proxies: list[DelayProxy] = []
        try:
            for port, activation_port in zip(self.ports, self.activation_ports, strict=True):
                self.proxies.append(DelayProxy(f"127.0.0.1:{port}", delay_ms).start())
                self.activation_proxies.append(DelayProxy(f"127.0.0.1:{activation_port}", delay_ms).start())
        except BaseException:
            self.close()
            raise

    def listen(self, stage: int) -> str:
        return f"127.0.0.1:{self.ports[stage - 1]}"

    def peer(self, stage: int) -> str:
        return str(self.proxies[stage - 1].address)

    def command(self, stage: int, argv: list[str]) -> list[str]:
        return [*argv, "--activation-listen", f"127.0.0.1:{self.activation_ports[stage - 1]}",
                "--activation-advertise", str(self.activation_proxies[stage - 1].address)]

    def traffic(self) -> list[dict]:
        """Per link into stage i: connections and bytes each way (control and activations)."""
        out = []
        for i, (control, frames) in enumerate(zip(self.proxies, self.activation_proxies, strict=True)):
            both = [control.traffic.to_json(), frames.traffic.to_json()]
            out.append({"link": f"{i}->{i + 1}", "method": self.method, "delay_ms": self.delay_ms,
                        **{key: sum(t[key] for t in both) for key in both[0]}})
        return out

    def close(self) -> None:
        for proxy in [*self.proxies, *self.activation_proxies]:
            proxy.stop()
        self.proxies, self.activation_proxies = [], []


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise LinkSetupError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")


class NetemLinks:
    """Stage i >= 1 in network namespace i; veth pairs with netem delay between neighbours."""

    method = "netem"

    def __init__(self, peers: int, delay_ms: float) -> None:
        self.peers = peers
        self.delay_ms = delay_ms
        self.note = "netem on veth pairs between network namespaces"
        tag = f"{os.getpid() % 0xFFFFF:x}"
        self.namespaces = [f"llb{tag}n{i}" for i in range(1, peers + 1)]
        # Interface names are capped at 15 characters.
        self.upstream_ifs = [f"llb{tag}u{i}" for i in range(1, peers + 1)]
        self.stage_ifs = [f"llb{tag}s{i}" for i in range(1, peers + 1)]
        self.port = 7700
        self._created: list[str] = []
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise

    def _ns(self, stage: int) -> str | None:
        """The namespace stage `stage` runs in; None for the host's (stage 0)."""
        return self.namespaces[stage - 1] if stage >= 1 else None

    def _in(self, stage: int, *argv: str) -> None:
        ns = self._ns(stage)
        _run(*(("ip", "netns", "exec", ns) if ns else ()), *argv)

    def _set_up(self) -> None:
        delay = f"{self.delay_ms:g}ms"
        for stage, ns in enumerate(self.namespaces, start=1):
            _run("ip", "netns", "add", ns)
            self._created.append(ns)
            self._in(stage, "ip", "link", "set", "lo", "up")
        for i in range(1, self.peers + 1):
            up, down = self.upstream_ifs[i - 1], self.stage_ifs[i - 1]
            _run("ip", "link", "add", up, "type", "veth", "peer", "name", down)
            if i == 1:
                self._created.append(f"link:{up}")  # lives in the host until deleted
            else:
                _run("ip", "link", "set", up, "netns", self.namespaces[i - 2])
            _run("ip", "link", "set", down, "netns", self.namespaces[i - 1])
            self._in(i - 1, "ip", "addr", "add", f"{_SUBNET}.{i}.1/24", "dev", up)
            self._in(i - 1, "ip", "link", "set", up, "up")
            self._in(i, "ip", "addr", "add", f"{_SUBNET}.{i}.2/24", "dev", down)
            self._in(i, "ip", "link", "set", down, "up")
            # One-way delay D on each end: D out, D back.
            self._in(i - 1, "tc", "qdisc", "add", "dev", up, "root", "netem", "delay", delay)
            self._in(i, "tc", "qdisc", "add", "dev", down, "root", "netem", "delay", delay)
        # Routes: each namespace sends everything upstream by default, and reaches the
        # stages further down through its downstream neighbour.
        for i in range(1, self.peers + 1):
            self._in(i, "ip", "route", "add", "default", "via", f"{_SUBNET}.{i}.1")
            self._in(i, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for i in range(0, self.peers):
            for j in range(i + 2, self.peers + 1):
                self._in(i, "ip", "route", "add", f"{_SUBNET}.{j}.0/24", "via", f"{_SUBNET}.{i + 1}.2")

    def listen(self, stage: int) -> str:
        return f"{_SUBNET}.{stage}.2:{self.port}"

    def peer(self, stage: int) -> str:
        return self.listen(stage)

    def command(self, stage: int, argv: list[str]) -> list[str]:
        # The stage listens on its namespace's veth address, which only this benchmark reaches.
        return ["ip", "netns", "exec", self.namespaces[stage - 1], *argv, "--insecure"]

    def traffic(self) -> list[dict]:
        """Bytes each end of each link's veth pair sent through netem."""
        out = []
        for i in range(1, self.peers + 1):
            out.append({"link": f"{i - 1}->{i}", "method": self.method, "delay_ms": self.delay_ms,
                        "bytes_to_target": self._sent(i - 1, self.upstream_ifs[i - 1]),
                        "bytes_from_target": self._sent(i, self.stage_ifs[i - 1])})
        return out

    def _sent(self, stage: int, dev: str) -> int | None:
        ns = self._ns(stage)
        argv = [*(("ip", "netns", "exec", ns) if ns else ()), "tc", "-s", "qdisc", "show", "dev", dev]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        match = re.search(r"Sent (\d+) bytes", done.stdout)
        return int(match.group(1)) if match else None

    def close(self) -> None:
        # Deleting a namespace deletes the veth ends in it, and with them their peers.
        for name in reversed(self._created):
            if name.startswith("link:"):
                argv = ("ip", "link", "del", name.removeprefix("link:"))
            else:
                argv = ("ip", "netns", "del", name)
            subprocess.run(argv, capture_output=True, timeout=20)
        self._created = []


def open_links(peers: int, delay_ms: float, method: str = "auto") -> StageLinks:
    """Links into `peers` stages after stage 0, each delayed `delay_ms` one way.

    `method` is auto (netem where it works, else proxies), netem or proxy.
    """
    if method not in LINK_METHODS:
        raise LinkSetupError(f"unknown link method {method!r}", hint=f"use one of {', '.join(LINK_METHODS)}")
    if peers == 0 or delay_ms <= 0:
        return LoopbackLinks(peers)
    if method == "proxy":
        return ProxyLinks(peers, delay_ms)
    try:
        links = NetemLinks(peers, delay_ms)
    except (LinkSetupError, OSError, subprocess.TimeoutExpired) as exc:
        if method == "netem":
            raise LinkSetupError(f"cannot delay links with netem: {exc}",
                                 hint="run as root on a kernel with the netem qdisc "
                                      "(sch_netem), or use --link-method proxy") from exc
        reason = str(exc).splitlines()[0]
        log.info("event=netem_unavailable fallback=proxy reason=%s", reason)
        return ProxyLinks(peers, delay_ms, note=f"netem unavailable ({_short(reason)})")
    log.info("event=links method=netem peers=%d delay_ms=%g", peers, delay_ms)
    return links


def _short(reason: str) -> str:
    if "qdisc kind is unknown" in reason:
        return "kernel has no netem qdisc"
    if "Operation not permitted" in reason or "Permission denied" in reason:
        return "needs root for network namespaces"
    if "No such file" in reason:
        return "no `ip`/`tc` here"
    return reason[:120]
