"""`layerline bench serve`: one model served under a matrix of conditions, the same prompts for each.

Conditions: a single stage (the baseline); the split over N stages; the split
with a draft model at fixed windows, the adaptive window and the auto window (sized by
cost), each with drafting overlapped with verification or not, or run ahead; the draft's
token trees (`--tree auto` or a shape D,W[,N]), each verified in one pass; each split
condition once per link delay; optionally llama.cpp's `llama-server` on the
same GGUF files, without and with its draft. Every condition gets clean
processes, warm-up requests, then `runs` passes over the prompts, greedy and
streamed. A split condition is compared with the single stage; a draft
condition with the split it speculates over (same stages, same links).

With `clients` beyond 1, every layerline condition then serves C concurrent
clients for each C on the same processes (the concurrency axis): aggregate
tok/s against one client's, time to first token under load, and whether every
answer is still the solo answer of its prompt.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from layerline.errors import LayerlineError
from layerline.packager.package import LayerPackage
from layerline.packager.window_spec import WindowSpec

from ..decode.draft_tree import check_tree_setting
from .client import RequestSample, stream_completion
from .clients import run_clients
from .link_delay import LINK_METHODS, StageLinks, open_links
from .models import BENCH_CACHE, resolve_gguf, resolve_package
from .servers import LayerlineServer, LlamaServer, check_stage_serve_accepts
from .stats import ConditionStats, LoadStats, solo_answers, summarize, summarize_load

log = logging.getLogger("layerline.bench")

DEFAULT_PROMPTS = (
    'def merge_sort(items):\n    """Sort a list with merge sort and return the new list."""\n',
    "# A command-line tool that counts the words in a text file\nimport argparse\n",
    "The three laws of thermodynamics say that",
)
WARMUP_TOKENS = 16
OVERLAP_MODES = ("off", "overlap", "run-ahead")
OVERLAP_LABELS = {"off": "", "overlap": " overlap", "run-ahead": " run-ahead"}  # in condition names
STAGE0_MAX_QUEUE = 32  # `layerline stage serve --max-queue`'s default
STAGE0_MAX_SESSIONS = 16  # `--max-sessions`'s default
TREE_GATE_WINDOW = 8  # a tree condition's fixed window: drafting stays on, the auto tree's depth bound


@dataclass(frozen=True)
class Condition:
    """One row of the table: what serves, how it is split, linked and drafted."""

    name: str
    engine: str  # "layerline" | "llama.cpp"
    stages: int = 1
    delay_ms: float = 0.0
    window_spec: WindowSpec | None = None  # None: no draft
    baseline: str | None = None  # the condition this one is compared with
    overlap: str = "off"  # "off" | "overlap" | "run-ahead" (OVERLAP_MODES), when drafting
    tree: str | None = None  # "auto" | "D,W[,N]": every drafting step verifies a tree; None: chains

    @property
    def draft(self) -> bool:
        return self.window_spec is not None

    @property
    def fixed_window(self) -> int | None:
        """The window every step drafts, when it is fixed (a tree's is not a window)."""
        spec = self.window_spec
        return spec.initial if spec is not None and spec.policy == "fixed" and self.tree is None else None

    @property
    def links(self) -> int:
        return self.stages - 1

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "engine": self.engine, "stages": self.stages, "delay_ms": self.delay_ms,
                "window": self.window_spec.to_json() if self.window_spec else None, "baseline": self.baseline,
                "overlap": self.overlap if self.draft else None, "tree": self.tree}


@dataclass(frozen=True)
class BenchSettings:
    target: str
    draft: str | None = None  # a model reference, or "ngram"
    stages: tuple[int, ...] = (2, 3)
    draft_stages: tuple[int, ...] = (2,)
    windows: tuple[int, ...] = (4, 8, 16)
    adaptive: bool = True
    auto: bool = False  # also the window sized by cost
    overlaps: tuple[str, ...] = ("off",)  # how drafting meets verification, each a condition
    trees: tuple[str, ...] = ()  # token trees ("auto", "D,W[,N]"), each a condition beside the chains
    delays_ms: tuple[float, ...] = (0.0,)
    link_method: str = "auto"
    pin: bool = False  # each stage process on a core of its own (emulates machines)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_tokens: int = 128
    runs: int = 3
    warmup: int = 1
    weights: str = "auto"
    quantize: str = "4bit"
    llama_server: Path | None = None
    llama_threads: int = 2
    context_length: int = 4096
    start_timeout_s: float = 900.0
    request_timeout_s: float = 900.0
    cache_dir: Path = BENCH_CACHE
    clients: tuple[int, ...] = (1,)  # concurrent clients per level; beyond 1, each layerline condition's axis
    max_batch: int | None = None  # stage 0's --max-batch, passed only when given
    lanes: int | None = None  # stage 0's --lanes, passed only when given

    @property
    def client_levels(self) -> tuple[int, ...]:
        """The concurrency axis: 1 (the baseline, measured anyway) and every other count; () for 1 alone."""
        levels = sorted({1, *self.clients})
        return tuple(levels) if len(levels) > 1 else ()

    def __post_init__(self) -> None:
        checks = [
            (self.link_method in LINK_METHODS, f"--link-method {self.link_method!r}",
             f"use one of {', '.join(LINK_METHODS)}"),
            (all(n >= 1 for n in (*self.stages, *self.draft_stages)), "a stage count below 1",
             "give stage counts of 1 or more"),
            (all(d >= 0 for d in self.delays_ms), "a negative link delay", "give delays of 0 ms or more"),
            (self.runs >= 1 and self.max_tokens >= 1 and self.warmup >= 0, "runs or max-tokens below 1",
             "measure at least one run of at least one token"),
            (bool(self.prompts), "no prompts", "give at least one --prompt"),
            (bool(self.overlaps) and all(m in OVERLAP_MODES for m in self.overlaps),
             f"--overlap {', '.join(self.overlaps) or 'nothing'}", f"use {', '.join(OVERLAP_MODES)}"),
            (bool(self.clients) and all(c >= 1 for c in self.clients),
             f"--clients {','.join(map(str, self.clients)) or 'nothing'}",
             "give client counts like 1,4,8,16"),
            (self.max_batch is None or self.max_batch >= 1, f"--max-batch {self.max_batch}",
             "let at least 1 request decode at a time"),
            (self.lanes is None or self.lanes >= 1, f"--lanes {self.lanes}", "give at least 1 lane"),
        ]
        for ok, what, fix in checks:
            if not ok:
                raise LayerlineError(f"bench serve cannot run with {what}", hint=fix)
        for window in self.windows:
            WindowSpec.fixed(window).validate()
        for tree in self.trees:
            if tree == "off":
                raise LayerlineError("bench serve --tree off",
                                     hint="the chains run anyway: give auto or D,W[,N]")
            check_tree_setting(tree)


def stage0_args(settings: BenchSettings) -> list[str]:
    """Stage 0's options for the concurrency axis: room for every client, and --max-batch and
    --lanes when given."""
    biggest = max(settings.clients)
    args = ["--max-queue", str(max(STAGE0_MAX_QUEUE, 2 * biggest))]
    if biggest > STAGE0_MAX_SESSIONS:  # else clients past 16 would wait in the queue, not decode
        args += ["--max-sessions", str(biggest)]
    if settings.max_batch is not None:  # only when asked: a server without the option refuses it
        args += ["--max-batch", str(settings.max_batch)]
    if settings.lanes is not None:
        args += ["--lanes", str(settings.lanes)]
    return args


def _suffix(delay_ms: float) -> str:
    return f" @{delay_ms:g}ms" if delay_ms else ""


def build_matrix(settings: BenchSettings) -> list[Condition]:
    """Every condition to run, baselines before the conditions compared with them."""
    conditions = [Condition("single", "layerline")]
    windows = ([WindowSpec.fixed(w) for w in settings.windows] + ([WindowSpec()] if settings.adaptive else [])
               + ([WindowSpec("auto")] if settings.auto else []))
    drafting = settings.draft is not None
    if drafting and 1 in settings.draft_stages:
        conditions += [_drafted(1, 0.0, w, "single", m) for w in windows for m in settings.overlaps]
        conditions += [_treed(1, 0.0, tree, "single") for tree in settings.trees]
    split_counts = sorted({n for n in (*settings.stages, *settings.draft_stages) if n >= 2}
                          if drafting else {n for n in settings.stages if n >= 2})
    for delay in settings.delays_ms:
        for n in split_counts:
            split = Condition(f"split{n}{_suffix(delay)}", "layerline", n, delay, baseline="single")
            conditions.append(split)
            if drafting and n in settings.draft_stages:
                conditions += [_drafted(n, delay, w, split.name, mode)
                               for w in windows for mode in settings.overlaps]
                conditions += [_treed(n, delay, tree, split.name) for tree in settings.trees]
    if settings.llama_server is not None:
        conditions.append(Condition("llama.cpp", "llama.cpp", baseline="single"))
        if drafting and settings.draft != "ngram":
            conditions += [Condition(f"llama.cpp + draft w={w}", "llama.cpp", window_spec=WindowSpec.fixed(w),
                                     baseline="llama.cpp") for w in settings.windows]
    return conditions


def _drafted(stages: int, delay: float, window: WindowSpec, baseline: str, overlap: str) -> Condition:
    base = "single" if stages == 1 else f"split{stages}"
    label = f"w={window.initial}" if window.policy == "fixed" else window.policy
    mode = OVERLAP_LABELS[overlap]
    return Condition(f"{base} + draft {label}{mode}{_suffix(delay)}", "layerline", stages, delay, window,
                     baseline, overlap)


def _treed(stages: int, delay: float, tree: str, baseline: str) -> Condition:
    """A condition whose drafting steps verify trees: the window policy only gates (a fixed 8,
    which never turns drafting off), the tree setting sizes each step."""
    base = "single" if stages == 1 else f"split{stages}"
    return Condition(f"{base} + draft tree {tree}{_suffix(delay)}", "layerline", stages, delay,
                     WindowSpec.fixed(TREE_GATE_WINDOW), baseline, tree=tree)


def level_mean_batch(before: dict[str, Any] | None, after: dict[str, Any] | None) -> float | None:
    """Mean sessions per pass between two reads of `batching`: from its `batch_sizes` histogram
    ({size: passes}) when both reads have one, else the later read's own `mean_batch`."""
    if after is None:
        return None
    sizes_after, sizes_before = after.get("batch_sizes"), (before or {}).get("batch_sizes", {})
    if isinstance(sizes_after, dict) and isinstance(sizes_before, dict):
        passes = {int(size): n - sizes_before.get(size, 0) for size, n in sizes_after.items()}
        total = sum(passes.values())
        if total > 0:
            return sum(size * n for size, n in passes.items()) / total
    value = after.get("mean_batch")
    return float(value) if isinstance(value, (int, float)) else None


@dataclass
class LoadLevel:
    """One point of the concurrency axis: C clients at once on a condition's servers."""

    clients: int
    stats: LoadStats | None = None
    samples: list[RequestSample] = field(default_factory=list)
    vs_one_client: float | None = None  # aggregate tok/s over the 1-client level's
    batching: dict[str, Any] | None = None  # stage 0's `/v1/status` -> `batching` after the level, if any
    batching_before: dict[str, Any] | None = None  # the same, read before the level
    seconds: float = 0.0
    error: str | None = None

    @property
    def mean_batch(self) -> float | None:
        """Sessions per batched pass during this level (stage 0's counters are since its start)."""
        return level_mean_batch(self.batching_before, self.batching)

    def to_json(self) -> dict[str, Any]:
        return {"clients": self.clients, "stats": self.stats.to_json() if self.stats else None,
                "vs_one_client": self.vs_one_client, "mean_batch": self.mean_batch,
                "batching": self.batching, "batching_before": self.batching_before,
                "seconds": round(self.seconds, 2), "error": self.error,
                "requests": [s.to_json() for s in self.samples]}


@dataclass
class ConditionResult:
    condition: Condition
    stats: ConditionStats | None = None
    samples: list[RequestSample] = field(default_factory=list)
    link_method: str | None = None  # "loopback" | "netem" | "proxy" for split conditions
    link_note: str | None = None
    link_traffic: list[dict] = field(default_factory=list)  # during the measured runs
    server: dict[str, Any] = field(default_factory=dict)  # stage 0's status, or llama-server's argv
    profile: dict[str, float] = field(default_factory=dict)  # ms per pass by part, measured requests
    seconds: float = 0.0  # the whole condition, start to stop
    error: str | None = None
    load: list[LoadLevel] = field(default_factory=list)  # the concurrency axis, 1 client first

    def to_json(self) -> dict[str, Any]:
        return {"condition": self.condition.to_json(),
                "stats": self.stats.to_json() if self.stats else None,
                "link": {"method": self.link_method, "note": self.link_note, "traffic": self.link_traffic},
                "server": self.server, "profile_ms_per_pass": self.profile,
                "seconds": round(self.seconds, 2), "error": self.error,
                "requests": [s.to_json() for s in self.samples],
                "concurrency": [level.to_json() for level in self.load]}


@dataclass(frozen=True)
class Models:
    """The files every condition serves from."""

    package: Path
    draft_package: Path | None  # None without a draft model (no draft, or ngram)
    hidden_size: int
    gguf: Path | None = None  # for llama-server
    draft_gguf: Path | None = None


def resolve_models(settings: BenchSettings) -> Models:
    """Packages (built and cached if needed) and, for llama-server, GGUF files."""
    cache = settings.cache_dir.expanduser()
    package = resolve_package(settings.target, cache, quantize=settings.quantize)
    draft = settings.draft
    draft_package = (resolve_package(draft, cache, quantize=settings.quantize)
                     if draft and draft != "ngram" else None)
    hidden = int(LayerPackage.open(package).manifest.config["hidden_size"])
    gguf = draft_gguf = None
    if settings.llama_server is not None:
        if not settings.llama_server.is_file():
            raise LayerlineError(f"--llama-server {settings.llama_server} does not exist",
                                 hint="build llama.cpp's llama-server and give the binary's path")
        gguf = resolve_gguf(settings.target)
        draft_gguf = resolve_gguf(draft) if draft and draft != "ngram" else None
    return Models(package, draft_package, hidden, gguf, draft_gguf)


def speculation_config(settings: BenchSettings, models: Models, condition: Condition) -> str:
    """The TOML stage 0 reads: speculation as the condition asks, nothing else."""
    if not condition.draft:
        return "# no speculation: stage 0 runs with --no-draft\n"
    lines = ["[defaults.speculative]", "enabled = true"]
    if settings.draft == "ngram":
        lines.append('type = "ngram"')
    else:
        lines.append(f'draft_model = "{models.draft_package}"')
    assert condition.window_spec is not None
    lines += [f"{key} = {json.dumps(value)}" for key, value in condition.window_spec.to_json().items()]
    lines += [f"overlap = {json.dumps(condition.overlap != 'off')}",
              f"run_ahead = {json.dumps(condition.overlap == 'run-ahead')}"]
    if condition.tree is not None:
        lines.append(f"tree = {json.dumps(condition.tree)}")
    return "\n".join(lines) + "\n"


def profile_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Milliseconds per target pass by part (stage 0's `profile`), over the passes between two reads."""
    passes = after.get("passes", 0) - before.get("passes", 0)
    if passes <= 0:
        return {}
    was = before.get("seconds", {})
    return {name.removesuffix("_s"): 1000 * (total - was.get(name, 0.0)) / passes
            for name, total in after.get("seconds", {}).items()}


def _slug(name: str) -> str:
    """A folder name for a condition: `split2 + draft w=4 @5ms` -> `split2-draft-w-4-5ms`."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def _traffic_delta(before: list[dict], after: list[dict]) -> list[dict]:
    out = []
    for b, a in zip(before, after, strict=True):
        row = dict(a)
        for key in ("connections", "bytes_to_target", "bytes_from_target"):
            if isinstance(a.get(key), int) and isinstance(b.get(key), int):
                row[key] = a[key] - b[key]
        out.append(row)
    return out


def check_links_carried(traffic: list[dict], tokens: int, hidden_size: int) -> None:
    """Every delayed link carried the activations of every token, so every link was delayed."""
    floor = tokens * hidden_size * 2  # at least one f16 vector per token, whatever the direction
    for link in traffic:
        carried = (link.get("bytes_to_target") or 0) + (link.get("bytes_from_target") or 0)
        if carried < floor:
            raise LayerlineError(
                f"link {link['link']} carried {carried} bytes while {tokens} tokens were generated "
                f"(at least {floor} expected): activations did not go through the delayed link",
                hint="stage i must forward to the address stage 0 was given for stage i+1")


class Bench:
    """Runs the matrix; one condition at a time, each with its own processes."""

    def __init__(self, settings: BenchSettings, output: Path) -> None:
        self.settings = settings
        self.output = output
        self.models: Models | None = None

    def run(self, conditions: list[Condition],
            on_result: Callable[[ConditionResult], None] | None = None) -> list[ConditionResult]:
        if self.settings.max_batch is not None:  # before any package is built
            check_stage_serve_accepts(["--max-batch"])
        self.models = resolve_models(self.settings)
        results = []
        for condition in conditions:
            result = self.run_condition(condition)
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results

    def run_condition(self, condition: Condition) -> ConditionResult:
        started = time.monotonic()
        result = ConditionResult(condition)
        log.info("event=condition_start name=%r", condition.name)
        try:
            if condition.engine == "llama.cpp":
                self._run_llama(condition, result)
            else:
                self._run_layerline(condition, result)
        except LayerlineError as exc:
            result.error = exc.message
            log.error("event=condition_failed name=%r error=%s", condition.name, exc.message)
        result.seconds = time.monotonic() - started
        log.info("event=condition_done name=%r seconds=%.1f", condition.name, result.seconds)
        return result

    def _run_layerline(self, condition: Condition, result: ConditionResult) -> None:
        settings, models = self.settings, self.models
        assert models is not None
        folder = self.output / "conditions" / _slug(condition.name)
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "config.toml"
        config.write_text(speculation_config(settings, models, condition))
        links: StageLinks = open_links(condition.links, condition.delay_ms, settings.link_method)
        result.link_method, result.link_note = links.method, links.note
        server = LayerlineServer(package=models.package, peers=condition.links, links=links,
                                 log_dir=folder, cache_dir=settings.cache_dir.expanduser() / "stage",
                                 config=config, draft=condition.draft, weights=settings.weights,
                                 pin=settings.pin, stage0_args=stage0_args(settings))
        try:
            server.start(settings.start_timeout_s)
            status_before = server.status()
            before, profile_before = links.traffic(), status_before.get("profile") or {}
            result.samples = self._measure(server.url, extra={})
            result.link_traffic = _traffic_delta(before, links.traffic())
            result.server = server.status()
            result.profile = profile_delta(profile_before, result.server.get("profile") or {})
            if settings.client_levels:
                result.load = self._measure_load(server, result.samples, status_before, result.server)
        finally:
            server.stop()
            links.close()
        round_trip = 2 * condition.delay_ms * condition.links
        result.stats = summarize(result.samples, window=condition.fixed_window,
                                 max_tokens=settings.max_tokens, link_round_trip_ms=round_trip)
        if condition.delay_ms and condition.links:
            check_links_carried(result.link_traffic, result.stats.tokens, models.hidden_size)

    def _measure_load(self, server: LayerlineServer, solo_samples: list[RequestSample],
                      solo_before: dict[str, Any], solo_after: dict[str, Any]) -> list[LoadLevel]:
        """The concurrency axis: the measured runs as the 1-client level, then C clients for each C."""
        settings = self.settings
        solo = solo_answers(solo_samples)
        one = LoadLevel(1, summarize_load(solo_samples, clients=1, solo=solo), solo_samples, 1.0,
                        solo_after.get("batching"), solo_before.get("batching"))
        levels = [one]
        for clients in settings.client_levels[1:]:
            log.info("event=clients_start clients=%d", clients)
            batching_before = server.status().get("batching")
            run = run_clients(server.url, settings.prompts, clients=clients, runs=settings.runs,
                              max_tokens=settings.max_tokens, timeout_s=settings.request_timeout_s)
            level = LoadLevel(clients, samples=run.samples, seconds=run.seconds,
                              batching=server.status().get("batching"), batching_before=batching_before)
            if run.errors:
                level.error = f"{len(run.errors)} of {clients} clients failed; {run.errors[0]}"
            if run.samples:
                level.stats = summarize_load(run.samples, clients=clients, solo=solo)
                base = one.stats.aggregate_tokens_per_s if one.stats is not None else 0.0
                level.vs_one_client = level.stats.aggregate_tokens_per_s / base if base else None
            log.info("event=clients_done clients=%d seconds=%.1f error=%s", clients, level.seconds,
                     level.error)
            levels.append(level)
        return levels

    def _run_llama(self, condition: Condition, result: ConditionResult) -> None:
        settings, models = self.settings, self.models
        assert models is not None and models.gguf is not None and settings.llama_server is not None
        folder = self.output / "conditions" / _slug(condition.name)
        folder.mkdir(parents=True, exist_ok=True)
        server = LlamaServer(binary=settings.llama_server, model=models.gguf,
                             draft=models.draft_gguf if condition.draft else None,
                             draft_max=condition.fixed_window, log_dir=folder,
                             threads=settings.llama_threads, context_length=settings.context_length)
        try:
            result.server = server.start(settings.start_timeout_s)
            # llama-server keeps the last prompt's cache; layerline does not: re-read every prompt.
            result.samples = self._measure(server.url, extra={"cache_prompt": False})
        finally:
            server.stop()
        result.stats = summarize(result.samples, window=condition.fixed_window,
                                 max_tokens=settings.max_tokens)

    def _measure(self, url: str, extra: dict[str, Any]) -> list[RequestSample]:
        settings = self.settings
        samples = []
        with httpx.Client() as client:
            def ask(index: int, run: int, max_tokens: int) -> RequestSample:
                body = {"prompt": settings.prompts[index], "max_tokens": max_tokens, "temperature": 0,
                        **extra}
                return stream_completion(client, url, body, prompt_index=index, run=run,
                                         timeout_s=settings.request_timeout_s)

            for i in range(settings.warmup):
                ask(i % len(settings.prompts), -1, min(WARMUP_TOKENS, settings.max_tokens))
            for run in range(settings.runs):
                for index in range(len(settings.prompts)):
                    samples.append(ask(index, run, settings.max_tokens))
        return samples
