"""Child processes a benchmark (or a test, or the demo) starts, and waiting until they serve.

Every process logs to a file; one that dies or does not come up in time is reported
with the end of its log.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from layerline.errors import LayerlineError

_PICK = random.SystemRandom()  # not the `random` a test may seed alike in every worker


def _ephemeral_low() -> int:
    """The lowest port the OS hands to bind(0) and outgoing connections (Linux: its setting)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`, below the OS's ephemeral range: a port
    from that range could be handed to another process's bind(0) or outgoing connection before
    the caller binds it (seen: a stage 0 that bound its HTTP port seconds later found it taken)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = _PICK.randrange(max(1024, low // 2), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the range below is crowded: let the OS choose
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerStartError(LayerlineError):
    """A benchmarked server did not come up."""


@dataclass
class Process:
    """A child process whose output goes to `log`."""

    name: str
    popen: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, argv: Sequence[str], log: Path, cwd: Path | None = None,
              cpus: frozenset[int] | None = None) -> Process:
        """Start `argv` logging to `log`; `cpus` pins it to those cores (one BLAS thread per core)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        env = None
        if cpus:
            env = {**os.environ, "OPENBLAS_NUM_THREADS": str(len(cpus))}
        with open(log, "ab") as out:
            popen = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        return cls(name, popen, log)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise ServerStartError(f"{self.name} exited with code {self.popen.returncode}; end of "
                                   f"{self.log}:\n{self.tail()}")

    def stop(self, grace_s: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


def wait_until(what: str, ready: Callable[[], Any], processes: Sequence[Process], deadline: float,
               log: Path) -> Any:
    """Poll `ready()` until it returns something truthy; raise if a process dies or time runs out."""
    while True:
        for process in processes:
            process.check_alive()
        result = ready()
        if result:
            return result
        if time.monotonic() > deadline:
            raise ServerStartError(f"{what} not ready in time; see {log}",
                                   hint="raise --start-timeout, or read the log for the cause")
        time.sleep(0.25)


def get_json(url: str) -> dict[str, Any] | None:
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def wait_healthy(url: str, processes: Sequence[Process], timeout_s: float, log: Path) -> None:
    """Wait until `url/health` answers 200 (stage 0 or llama-server serving)."""
    wait_until(f"the server at {url}", lambda: get_json(f"{url}/health") is not None, processes,
               time.monotonic() + timeout_s, log)


def wait_listening(process: Process, timeout_s: float) -> None:
    """Wait until a `layerline stage serve` process has logged that it listens."""
    wait_until(process.name, lambda: "listening on" in process.tail(), [process],
               time.monotonic() + timeout_s, process.log)
