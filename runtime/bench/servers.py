"""The servers a serving benchmark measures: layerline's stages, and llama.cpp's `llama-server`.

Each condition gets fresh processes: started, waited on until they answer
(with a draft, until the draft is loaded too), and stopped afterwards. Every
process logs to a file in the output folder; a server that does not come up is
reported with the end of its log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .link_delay import StageLinks
from .processes import (
    Process,
    ServerStartError,
    free_port,
    get_json,
    wait_healthy,
    wait_listening,
    wait_until,
)


class LayerlineServer:
    """Stage 0 serving HTTP on loopback, with `peers` stage processes behind it over `links`."""

    def __init__(self, *, package: Path, peers: int, links: StageLinks, log_dir: Path, cache_dir: Path,
                 config: Path | None, draft: bool, weights: str = "auto",
                 python: str = sys.executable, pin: bool = False, stage0_args: Sequence[str] = ()) -> None:
        self.package, self.peers, self.links = package, peers, links
        self.pin = pin  # each stage process on a core of its own, as if on its own machine
        self.log_dir, self.cache_dir, self.config = log_dir, cache_dir, config
        self.draft, self.weights, self.python = draft, weights, python
        self.stage0_args = list(stage0_args)  # more options for stage 0's command line
        self.url = ""  # stage 0's, once start() picked its port
        self.processes: list[Process] = []

    def start(self, timeout_s: float) -> dict[str, Any]:
        """Start every stage, wait until stage 0 serves (and its draft is loaded); return its status."""
        deadline = time.monotonic() + timeout_s
        layerline = [self.python, "-m", "layerline", "stage", "serve"]
        try:
            for i in range(1, self.peers + 1):
                log = self.log_dir / f"stage{i}.log"
                argv = self.links.command(i, [*layerline, "--listen", self.links.listen(i),
                                              "--cache-dir", str(self.cache_dir)])
                stage = Process.start(f"stage {i}", argv, log, cpus=self._cpus(i))
                self.processes.append(stage)
                wait_listening(stage, deadline - time.monotonic())
            # Stage 0's port is picked once the peers listen: a peer listening on port 0 could
            # otherwise take the port free_port() had just found free (seen in CI: "address already in use").
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            argv = [*layerline, "--package", str(self.package), "--http", f"127.0.0.1:{port}",
                    "--cache-dir", str(self.cache_dir), "--weights", self.weights]
            for i in range(1, self.peers + 1):
                argv += ["--peer", self.links.peer(i)]
            if self.config is not None:
                argv += ["--config", str(self.config)]
            if not self.draft:
                argv.append("--no-draft")
            argv += self.stage0_args
            log = self.log_dir / "stage0.log"
            self.processes.insert(0, Process.start("stage 0", argv, log, cpus=self._cpus(0)))
            wait_healthy(self.url, self.processes, deadline - time.monotonic(), log)
            if self.draft:
                wait_until("the draft model", self._draft_ready, self.processes, deadline, log)
            return self.status()
        except BaseException:
            self.stop()
            raise

    def _cpus(self, stage: int) -> frozenset[int] | None:
        """Stage i's core when pinning (round robin over the cores this process may use)."""
        if not self.pin:
            return None
        cores = sorted(os.sched_getaffinity(0))
        return frozenset({cores[stage % len(cores)]})

    def _draft_ready(self) -> bool:
        status = get_json(f"{self.url}/v1/status") or {}
        speculative = status.get("speculative") or {}
        if speculative.get("active"):
            return True
        draft = speculative.get("draft") or {}
        if draft.get("state") == "failed" or (speculative and not speculative.get("enabled")):
            reason = draft.get("reason") or speculative.get("inactive_reason") or speculative.get("reason")
            raise ServerStartError(f"stage 0 serves without its draft: {reason}",
                                   hint="check --draft (a package folder, GGUF file or shipped model "
                                        "name sharing the target's tokenizer)")
        return False

    def status(self) -> dict[str, Any]:
        return get_json(f"{self.url}/v1/status") or {}

    def stop(self) -> None:
        # Stage 0 first: it releases its peers on the way out.
        for process in self.processes:
            process.stop()
        self.processes = []


def check_stage_serve_accepts(options: Sequence[str], python: str = sys.executable) -> None:
    """Refuse at once, not once per condition, options this `layerline stage serve` does not know."""
    env = {**os.environ, "COLUMNS": "200"}  # the help table must not cut option names
    try:
        help_text = subprocess.run([python, "-m", "layerline", "stage", "serve", "--help"],
                                   capture_output=True, text=True, timeout=120, env=env).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerStartError(f"cannot run layerline stage serve --help: {exc}") from exc
    unknown = [option for option in options
               if not re.search(rf"{re.escape(option)}(?![\w-])", help_text)]  # not --max-batch-tokens
    if unknown:
        raise ServerStartError(f"this layerline's `stage serve` has no {', '.join(unknown)}",
                               hint="leave the option out, or install a layerline whose stage 0 has it")


def llama_server_draft_args(binary: Path, draft: Path, window: int) -> list[str]:
    """Arguments that make this llama-server build draft `window` tokens with `draft` every step.

    The flags were renamed in 2025 (`--draft-max` -> `--spec-draft-n-max`), and newer
    builds draft only with an explicit `--spec-type draft-simple`; `--help` says which.
    """
    try:
        help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True,
                                   timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerStartError(f"cannot run {binary} --help: {exc}",
                               hint="pass the path of a built llama-server to --llama-server") from exc
    # Always draft the full window (no minimum probability), as layerline's fixed window does.
    if "--spec-draft-n-max" in help_text:
        args = ["-md", str(draft), "--spec-draft-n-max", str(window), "--spec-draft-n-min", "0",
                "--spec-draft-p-min", "0"]
        return args + (["--spec-type", "draft-simple"] if "draft-simple" in help_text else [])
    if "--draft-max" in help_text:
        return ["-md", str(draft), "--draft-max", str(window), "--draft-min", "0", "--draft-p-min", "0"]
    raise ServerStartError(f"{binary} --help shows no draft flags; is it llama.cpp's llama-server?")


class LlamaServer:
    """llama.cpp's `llama-server` on the target GGUF, with the draft GGUF when `draft_max` is set."""

    def __init__(self, *, binary: Path, model: Path, draft: Path | None, draft_max: int | None,
                 log_dir: Path, threads: int, context_length: int) -> None:
        self.binary, self.model, self.draft, self.draft_max = binary, model, draft, draft_max
        self.log_dir, self.threads, self.context_length = log_dir, threads, context_length
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Process | None = None
        self.argv = self._argv()

    def _argv(self) -> list[str]:
        argv = [str(self.binary), "-m", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
                "-t", str(self.threads), "--ctx-size", str(self.context_length), "-np", "1",
                "--temp", "0"]
        if self.draft is not None and self.draft_max:
            argv += llama_server_draft_args(self.binary, self.draft, self.draft_max)
        return argv

    def start(self, timeout_s: float) -> dict[str, Any]:
        log = self.log_dir / "llama-server.log"
        self.process = Process.start("llama-server", self.argv, log)
        try:
            wait_healthy(self.url, [self.process], timeout_s, log)
        except BaseException:
            self.stop()
            raise
        return {"argv": self.argv}

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
