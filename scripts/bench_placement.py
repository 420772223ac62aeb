"""Placement by measured capacity against the splits tried by hand: the planned split's pass and the best.

    python scripts/bench_placement.py --package PKG [--busy 3] [--stride 1] [--first K] [--tokens 32]

Stage 0 on one core, one peer pinned to another core that `--busy` spinning processes share,
so the peer has about 1/(busy+1) of a core: heterogeneous stages on one machine. The peer
stays up; stage 0 is started once with the planned split (`--split auto`) and once per
split `0:k,k:N` for every k in steps of `--stride` (from `--first`), and each time times greedy decoding
(the stream's time per token after its first, best of `--repeats` requests). Prints a
Markdown table and how far the planned split's pass is from the best one tried.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

from layerline.runtime.bench.processes import Process, free_port, get_json, wait_healthy, wait_listening

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def decode_ms_per_token(url: str, model: str, tokens: int, repeats: int) -> float:
    """Best over `repeats` greedy streams: milliseconds per token after the first."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": PROMPT}]
    client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        stamps = []
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=tokens,
                                                    temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
        if len(stamps) > 2:
            best = min(best, (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000)
    return best


def run_split(args: argparse.Namespace, split: str, peer: str, core: int, log_dir: Path) -> dict:
    """Start stage 0 with `split`, time decoding, stop it; the status and the time per token."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = log_dir / f"stage0-{split.replace(':', '_').replace(',', '-')}.log"
    argv = [sys.executable, "-m", "layerline", "stage", "serve", "--package", str(args.package), "--http",
            f"127.0.0.1:{port}", "--cache-dir", str(log_dir / "cache"), "--no-draft", "--split", split,
            "--peer", peer]
    stage0 = Process.start("stage 0", argv, log, cpus=frozenset({core}))
    try:
        wait_healthy(url, [stage0], 300, log)
        status = get_json(f"{url}/v1/status") or {}
        ms = decode_ms_per_token(url, status["model"], args.tokens, args.repeats)
        return {"split": status["split"], "placement": status.get("placement"), "ms_per_token": ms}
    finally:
        stage0.stop()


def main() -> int:
    """Run the comparison and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--busy", type=int, default=3, help="spinning processes on the peer's core")
    parser.add_argument("--stride", type=int, default=1, help="try every k-th split boundary")
    parser.add_argument("--first", type=int, default=0, help="try boundaries from this layer on (0: stride)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print("needs two cores", file=sys.stderr)
        return 1
    slow_core, fast_core = cores[0], cores[1]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-placement-"))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                 preexec_fn=lambda: os.sched_setaffinity(0, {slow_core}))
                for _ in range(args.busy)]
    peer_port = free_port()
    peer = Process.start("peer", [sys.executable, "-m", "layerline", "stage", "serve", "--listen",
                                  f"127.0.0.1:{peer_port}", "--cache-dir", str(log_dir / "cache")],
                         log_dir / "peer.log", cpus=frozenset({slow_core}))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the peer and the spinners on the way out
    try:
        wait_listening(peer, 60)
        endpoint = f"127.0.0.1:{peer_port}"
        planned = run_split(args, "auto", endpoint, fast_core, log_dir)
        layers = planned["split"][-1][1]
        tried = {planned["split"][0][1]: planned["ms_per_token"]}
        for k in range(args.first or args.stride, layers, args.stride):
            result = run_split(args, f"0:{k},{k}:{layers}", endpoint, fast_core, log_dir)
            tried[k] = min(tried.get(k, float("inf")), result["ms_per_token"])
            print(f"split 0:{k},{k}:{layers}: {result['ms_per_token']:.1f} ms/token", file=sys.stderr,
                  flush=True)
    finally:
        peer.stop()
        for spinner in spinners:
            spinner.kill()
            spinner.wait(timeout=10)
    k_planned = planned["split"][0][1]
    best_k = min(tried, key=lambda k: tried[k])
    print("| stage 0 layers | peer layers | ms / token |")
    print("| --- | --- | --- |")
    for k in sorted(tried):
        mark = " (planned)" if k == k_planned else ""
        print(f"| {k}{mark} | {layers - k} | {tried[k]:.1f} |")
    ratio = planned["ms_per_token"] / tried[best_k]
    print(f"\nplanned 0:{k_planned}: {planned['ms_per_token']:.1f} ms/token (its own run); best tried "
          f"0:{best_k}: {tried[best_k]:.1f} ms/token; planned / best = {ratio:.2f}")
    print(f"placement: {planned['placement']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
