"""Many users at once: C streaming clients, each on its own thread and connection, started together.

Every client sends the bench prompts one after another, `runs` times, as one
user would; client k starts at prompt k (mod the prompt count), so requests of
different lengths are in flight together. A barrier releases every client at
the same moment, so the first requests arrive as one burst.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from layerline.errors import LayerlineError

from .client import RequestSample, stream_completion

BARRIER_TIMEOUT_S = 60.0  # threads start in milliseconds; this only guards a broken start


@dataclass
class ClientsRun:
    """What C clients at once got back: every request, and each client's failure if it had one."""

    clients: int
    samples: list[RequestSample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the barrier's release to the last client's end


def run_clients(url: str, prompts: Sequence[str], *, clients: int, runs: int, max_tokens: int,
                timeout_s: float, extra: dict[str, Any] | None = None) -> ClientsRun:
    """`clients` concurrent streaming clients, each sending every prompt `runs` times (greedy)."""
    if clients < 1:
        raise LayerlineError(f"cannot run {clients} clients", hint="give client counts of 1 or more")
    barrier = threading.Barrier(clients + 1)  # the clients and this thread, which starts the clock
    per_client: list[list[RequestSample]] = [[] for _ in range(clients)]
    failures: list[str | None] = [None] * clients

    def client(k: int) -> None:
        with httpx.Client() as http:
            try:
                barrier.wait(BARRIER_TIMEOUT_S)
            except threading.BrokenBarrierError:
                failures[k] = f"client {k} never started: the start barrier broke"
                return
            try:
                for run in range(runs):
                    for step in range(len(prompts)):
                        index = (k + step) % len(prompts)
                        body = {"prompt": prompts[index], "max_tokens": max_tokens, "temperature": 0,
                                **(extra or {})}
                        per_client[k].append(stream_completion(http, url, body, prompt_index=index, run=run,
                                                               timeout_s=timeout_s, client_index=k))
            except LayerlineError as exc:
                failures[k] = f"client {k}: {exc.message}"

    threads = [threading.Thread(target=client, args=(k,), name=f"bench-client-{k}", daemon=True)
               for k in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait(BARRIER_TIMEOUT_S)
    started = time.monotonic()
    # Each request has its own timeout; a client outliving all of its requests' timeouts is stuck.
    deadline = started + timeout_s * runs * len(prompts) + BARRIER_TIMEOUT_S
    for k, thread in enumerate(threads):
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            failures[k] = f"client {k} still waiting after {deadline - started:.0f} s"
    result = ClientsRun(clients, seconds=time.monotonic() - started)
    result.samples = sorted((s for samples in per_client for s in samples), key=lambda s: s.sent_at)
    result.errors = [f for f in failures if f is not None]
    return result
