"""What several test modules use: tiny model writers, stage processes, a clock, a local target.

Fixtures built on these live in conftest.py; no test module imports another.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai

from layerline.proto import activation_pb2 as act_pb
from layerline.runtime.bench.delay_proxy import DelayProxy
from layerline.runtime.bench.processes import Process, free_port, wait_healthy, wait_listening
from layerline.runtime.bench.tiny_model import llama_config
from layerline.runtime.model.cpu_kernel import ISA_ENV_VAR
from layerline.runtime.serve.stage0 import Stage0
from layerline.runtime.stage.client import ActivationAddress
from layerline.runtime.stage.frame_budget import FrameBudget
from layerline.runtime.stage.frame_transport import FrameConnection

HF_TEST_TOKEN = "hf_secret_token"  # what the `logged_in` fixture makes huggingface_hub return

# ---------------------------------------------------------------- tiny models

# The tests' tiny random llama: 4 layers, hidden 64, SmolLM2's vocabulary, context 512.
TINY_LLAMA_CONFIG = llama_config(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, context=512)


def sweep_on_isa(script: str, isa: str) -> dict:
    """Run a kernel check `script` in a process held to instruction set `isa`: the JSON report it
    prints last. Skips the test where this CPU lacks `isa` (the report's "isa" says what ran)."""
    import pytest  # only the tests call this

    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, ISA_ENV_VAR: isa},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["isa"] != isa:
        pytest.skip(f"this CPU has no {isa} (ran {report['isa']})")
    return report


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (the inverse of the packager's)."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )



def _layerline(*args: str) -> list[str]:
    return [sys.executable, "-m", "layerline", *args]


class StageProcess:
    """A `layerline stage serve` subprocess on loopback, waited on until it listens."""

    def __init__(self, args: tuple[str, ...], cache_dir: Path, port: int | None = None,
                 cpus: frozenset[int] | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        # A log of its own per start: a restarted stage must not be taken for listening already.
        log = cache_dir / f"stage-{self.port}-{uuid.uuid4().hex[:6]}.log"
        argv = _layerline("stage", "serve", "--listen", self.endpoint, "--cache-dir", str(cache_dir), *args)
        self.process = Process.start(f"stage {self.endpoint}", argv, log, cpus=cpus)
        try:
            wait_listening(self.process, timeout_s=60)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        self.process.popen.kill()
        self.process.popen.wait(timeout=10)

    def stop(self) -> None:
        self.process.stop(grace_s=10)


class Stage0Process:
    """`layerline stage serve --package …` in a subprocess, waited on until /health is ok."""

    def __init__(self, package: Path, peers: list[str], cache: Path, *extra: str,
                 http_host: str = "127.0.0.1", cwd: Path | None = None, wait: bool = True,
                 cpus: frozenset[int] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cache / f"stage0-{self.port}.log"
        argv = _layerline("stage", "serve", "--package", str(package), "--http", f"{http_host}:{self.port}",
                          "--cache-dir", str(cache), *extra)
        for peer in peers:
            argv += ["--peer", peer]
        self.process = Process.start("stage 0", argv, self.log, cwd, cpus=cpus)
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> None:
        try:
            wait_healthy(self.url, [self.process], timeout_s=180, log=self.log)
        except BaseException:
            self.stop()
            raise

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def status(self) -> dict:
        return httpx.get(f"{self.url}/v1/status", timeout=10).json()

    def metric(self, name: str, **labels: str) -> float:
        """One sample of stage 0's Prometheus metrics (0 when it is not there yet)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)$"
        found = re.search(pattern, text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def stop(self) -> None:
        self.process.stop(grace_s=15)


@contextlib.contextmanager
def speculating_over_delayed_links(
        package: Path, draft: Path, root: Path, *extra: str,
        delay_ms: int = 20) -> Iterator[tuple[Stage0Process, StageProcess, DelayProxy]]:
    """Stage 0 (layer 0, drafting 8 tokens a window with `draft`) and one peer (layers 1..4),
    control and activation links each behind a `delay_ms` proxy: (stage 0, the peer, the frames'
    proxy), all stopped after."""
    (root / "peer").mkdir()
    frames_port = free_port()
    frames_proxy = DelayProxy(f"127.0.0.1:{frames_port}", delay_ms=delay_ms).start()
    peer = StageProcess(("--activation-listen", f"127.0.0.1:{frames_port}",
                         "--activation-advertise", str(frames_proxy.address)), root / "peer")
    proxy = DelayProxy(peer.endpoint, delay_ms=delay_ms).start()
    (root / "config.toml").write_text(f'[defaults.speculative]\ndraft_model = "{draft}"\n'
                                      'window_policy = "fixed"\ninitial_window = 8\n')
    stage0 = None
    try:
        stage0 = Stage0Process(package, [str(proxy.address)], root, "--split", "0:1,1:4",
                               "--config", str(root / "config.toml"), *extra)
        yield stage0, peer, frames_proxy
    finally:
        if stage0 is not None:
            stage0.stop()
        proxy.stop()
        frames_proxy.stop()
        peer.stop()


@contextlib.contextmanager
def brought_up(stage0: Stage0) -> Iterator[Stage0]:
    """`stage0` (in this process) started, its peers claimed and loaded; shut down after."""
    try:
        stage0.start()
        stage0.bring_up()
        yield stage0
    finally:
        if stage0.scheduler is not None:
            stage0.scheduler.close()
        if stage0._coordinator is not None:
            stage0.coordinator.shutdown()
        if stage0.file_server is not None:
            stage0.file_server.stop(grace=None)


@contextlib.contextmanager
def admin_pipeline(package: Path, root: Path, split: str, admin_token: str
                   ) -> Iterator[tuple[Stage0Process, StageProcess]]:
    """Stage 0 (admin token set) over one peer process, stopped on the way out.

    Its config holds nothing from the user's own: `PUT /v1/draft` may load drafts from this
    worker's temporary folders and the run's shared packages (beside `package`), and Hub drafts
    of `layerline-tests/`.
    """
    (root / "admin-token").write_text(admin_token + "\n")
    (root / "config.toml").write_text(f'[admin]\ndraft_roots = ["{root.parent}", "{package.parent}"]\n'
                                      'hub_drafts = ["layerline-tests/*"]\n')
    (root / "peer").mkdir()
    peer = StageProcess((), root / "peer")
    try:
        stage0 = Stage0Process(package, [peer.endpoint], root, "--split", split,
                               "--admin-token-file", str(root / "admin-token"),
                               "--config", str(root / "config.toml"))
    except BaseException:
        peer.stop()
        raise
    try:
        yield stage0, peer
    finally:
        stage0.stop()
        peer.stop()


def greedy_reference(package: Path, prompt: str, max_tokens: int) -> str:
    """The answer of `layerline run`, one process, no split."""
    done = subprocess.run(_layerline("run", str(package), "--prompt", prompt, "--max-tokens", str(max_tokens),
                                     "--temperature", "0", "--quiet"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n")
    return done.stdout[:-1]  # `run` ends its output with one newline


def activation_connection(control_endpoint: str, token: str | None = None) -> FrameConnection:
    """A raw activation connection to the stage whose control endpoint is given (60 s per frame)."""
    address = ActivationAddress(control_endpoint, token).get()
    return FrameConnection(address, budget=FrameBudget(60.0), token=token)


def batch_frame(seq: int, rows: list[tuple[str, int, np.ndarray]], *, dtype: int = act_pb.WIRE_DTYPE_F32,
                shape: list[int] | None = None) -> act_pb.ActivationFrame:
    """A batch frame of (session, start_pos, f32 hidden states (1, n, D)) rows, as stage 0 sends;
    `dtype` and `shape` say other than the tensor does, to make a malformed frame."""
    data = np.concatenate([array for _, _, array in rows], axis=1)
    return act_pb.ActivationFrame(seq=seq, batch=act_pb.BatchActivations(
        sessions=[act_pb.SessionRows(session_id=session, start_pos=start, token_count=array.shape[1])
                  for session, start, array in rows],
        activations=act_pb.Activations(token_count=data.shape[1], dtype=dtype,
                                       shape=shape if shape is not None else list(data.shape),
                                       data=data.tobytes())))


def older_stage0_frame(session: str, seq: int, array: np.ndarray) -> act_pb.ActivationFrame:
    """One session's hidden states as an older stage 0 sent them: in ActivationFrame's field 3,
    reserved since every frame is a batch (so it parses as an unknown field)."""
    old_body = act_pb.Activations(token_count=array.shape[1], dtype=act_pb.WIRE_DTYPE_F32,
                                  shape=list(array.shape), data=array.tobytes()).SerializeToString()
    field_3 = bytes([3 << 3 | 2]) + _varint(len(old_body)) + old_body  # length-delimited
    return act_pb.ActivationFrame.FromString(
        act_pb.ActivationFrame(session_id=session, seq=seq).SerializeToString() + field_3)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


# ---------------------------------------------------------------- in-process helpers


class Clock:
    """A clock the test moves by hand: `clock.now += 5`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- a faulty link


class FaultyLink:
    """A TCP proxy to a gRPC server that breaks what comes back: it cuts every connection once
    `cut_after` bytes have passed (then, with `refuse_after_cut`, takes no new ones), or stalls once
    `stall_after` bytes have passed until the test calls `cut()` (nothing then depends on how fast
    the client read what came before), or flips a
    byte in the middle of the first `corrupt_frames` large HTTP/2 DATA frames (a file chunk's
    bytes, past every header) — a link that damages data in flight, which TCP alone cannot see —
    or, with `bytes_per_s`, passes what comes back no faster than that: a slow source."""

    def __init__(self, target: str, *, cut_after: int | None = None, refuse_after_cut: bool = False,
                 stall_after: int | None = None, corrupt_frames: int = 0,
                 bytes_per_s: float | None = None) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.cut_after, self.refuse_after_cut = cut_after, refuse_after_cut
        self.stall_after = stall_after
        self._cut_now = threading.Event()
        self.corrupt_frames = corrupt_frames
        self.bytes_per_s = bytes_per_s
        self.bytes_back = 0  # server -> client, over every connection
        self.corrupted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, back: bool) -> None:
        pending = b""
        try:
            while data := source.recv(1 << 16):
                if not back:
                    sink.sendall(data)
                    continue
                pending += data
                frames, pending = self._frames(pending)
                if self.cut_after is not None and self.bytes_back + len(frames) > self.cut_after:
                    sink.sendall(frames[:max(0, self.cut_after - self.bytes_back)])
                    self.bytes_back, self.cut_after = self.cut_after, None  # once
                    self.cut()
                    return
                if self.stall_after is not None and self.bytes_back + len(frames) > self.stall_after:
                    sink.sendall(frames[:max(0, self.stall_after - self.bytes_back)])
                    self.bytes_back, self.stall_after = self.stall_after, None  # once
                    self._cut_now.wait()
                    return
                self.bytes_back += len(frames)
                sink.sendall(frames)
                if self.bytes_per_s:
                    time.sleep(len(frames) / self.bytes_per_s)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _frames(self, data: bytes) -> tuple[bytes, bytes]:
        """The whole HTTP/2 frames at the start of `data` (some of them damaged), and the rest."""
        out, at = bytearray(), 0
        while len(data) - at >= 9:
            length = int.from_bytes(data[at:at + 3], "big")
            if len(data) - at < 9 + length:
                break
            frame = bytearray(data[at:at + 9 + length])
            if frame[3] == 0 and length >= 4096 and self.corrupted < self.corrupt_frames:
                frame[9 + length // 2] ^= 0xFF
                self.corrupted += 1
            out += frame
            at += 9 + length
        return bytes(out), data[at:]

    def cut(self) -> None:
        """Drop every connection now (and, with refuse_after_cut, every later one)."""
        self._cut_now.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        if self.refuse_after_cut:
            self.close()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        with contextlib.suppress(OSError):
            self._listener.close()


# ---------------------------------------------------------------- speculation on a real stage 0

PROMPTS = ["The capital of France is",
           "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"]
MAX_TOKENS = 24
WINDOWS = [{"window": 1}, {"window": 4}, {"window": 16}, None]  # None: the server's adaptive policy


def start_stage0(package, peers: int, cache, config_text: str | None,
                 *extra: str) -> tuple[Stage0Process, list[StageProcess]]:
    """Stage 0 over `peers` fresh stage processes, with `config_text` as its TOML config."""
    cache.mkdir(parents=True, exist_ok=True)
    stages = [StageProcess((), cache) for _ in range(peers)]
    args = list(extra)
    if config_text is not None:
        config = cache / "config.toml"
        config.write_text(config_text)
        args += ["--config", str(config)]
    try:
        return Stage0Process(package, [s.endpoint for s in stages], cache, *args), stages
    except Exception:
        for stage in stages:
            stage.stop()
        raise


def wait_for_draft(stage0: Stage0Process, state: str) -> dict:
    """The speculation status once the draft reached `state` (ready or failed)."""
    for _ in range(600):
        speculative = stage0.status()["speculative"]
        if speculative["draft"]["state"] == state:
            return speculative
        assert speculative["draft"]["state"] == "loading", speculative
        time.sleep(0.2)
    raise AssertionError(f"the draft never became {state}")


def complete(stage0: Stage0Process, prompt: str, speculative: dict | None, **kwargs) -> dict:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **kwargs}
    if speculative is not None:
        body["speculative"] = speculative
    reply = httpx.post(f"{stage0.url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()
