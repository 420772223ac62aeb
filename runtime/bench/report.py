"""The serving benchmark's output: Markdown tables, the goals it reports against, JSON, a PNG chart.

Everything lands in one folder: `table.md` (what the command prints),
`results.json` (settings, machine, every request's raw figures), `chart.png`,
and with several client counts `concurrency.png`.
Files are written to a temporary name and renamed, so a folder never holds a
half-written report, even when the run is stopped between conditions.
"""

from __future__ import annotations

import io
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from layerline.atomic_write import write_atomic

from .serve import BenchSettings, ConditionResult

TABLE_COLUMNS = ("condition", "stages", "link", "draft", "tok/s", "wall s", "TTFT s", "accept rate",
                 "accept/position", "tok/pass", "expected tok/pass", "baseline", "vs baseline",
                 "× baseline")
PROFILE_COLUMNS = ("condition", "ms/pass", "draft ms", "verify ms", "link delay ms", "outside ms",
                   "tok/pass")
SPLIT_GOAL = 0.97  # 2-stage split on loopback, against the single stage
SPECULATION_GOAL = 2.0  # speculation over a delayed 2-stage split, against that split
PASS_GOAL = 0.10  # tokens per pass, against (1 - a^(w+1)) / (1 - a)
LOAD_COLUMNS = ("condition", "clients", "requests", "aggregate tok/s", "× 1 client", "client decode tok/s",
                "TTFT p50 s", "TTFT p90 s", "same text")
MEAN_BATCH_COLUMN = "mean batch"  # shown when stage 0's `/v1/status` -> `batching` has `mean_batch`
CLIENT_GOALS = {8: 4.0, 16: 6.0}  # 2-stage split: aggregate tok/s at C clients over one client's
TTFT_GOAL = (8, 2.0)  # 2-stage split: p50 time to first token at 8 clients over one client's


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def ratios(results: Sequence[ConditionResult]) -> dict[str, float | None]:
    """Each condition's median tok/s over its baseline's (None without one)."""
    by_name = {r.condition.name: r for r in results}
    out: dict[str, float | None] = {}
    for r in results:
        base = by_name.get(r.condition.baseline or "")
        if r.stats and base is not None and base.stats and base.stats.tokens_per_s:
            out[r.condition.name] = r.stats.tokens_per_s / base.stats.tokens_per_s
        else:
            out[r.condition.name] = None
    return out


def _link(r: ConditionResult) -> str:
    c = r.condition
    if c.engine != "layerline" or c.stages == 1:
        return "—"
    if not c.delay_ms:
        return "loopback"
    return f"{c.delay_ms:g} ms {r.link_method or '?'}"


def _draft(r: ConditionResult) -> str:
    c = r.condition
    if not c.draft:
        return "—"
    assert c.window_spec is not None
    if c.tree is not None:
        return f"tree {c.tree}"
    label = f"w={c.fixed_window}" if c.fixed_window is not None else c.window_spec.policy
    return label + {"off": "", "overlap": ", overlap", "run-ahead": ", run-ahead"}.get(c.overlap, "")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(columns: Sequence[str], rows: list[Sequence[str]]) -> str:
    return "\n".join([_row(columns), "|" + "|".join("---" for _ in columns) + "|",
                      *(_row(row) for row in rows)])


def render_table(results: Sequence[ConditionResult]) -> str:
    """The main table: one row per condition, compared with its baseline."""
    rel = ratios(results)
    rows = []
    for r in results:
        c, s = r.condition, r.stats
        ratio = rel.get(c.name)
        if s is None:
            failure = "failed: " + (r.error or "?").splitlines()[0][:60].replace("|", "/")
            rows.append([c.name, str(c.stages), _link(r), _draft(r), failure, *["—"] * 6, c.baseline or "—",
                         "—", "—"])
            continue
        rows.append([
            c.name, str(c.stages), _link(r), _draft(r), f"{s.tokens_per_s:.2f}", f"{s.wall_s:.2f}",
            f"{s.ttft_s:.3f}", _cell(s.accept_rate, ".1%"), _cell(s.position_accept_rate, ".1%"),
            _cell(s.tokens_per_pass, ".2f"), _cell(s.expected_tokens_per_pass, ".2f"), c.baseline or "—",
            "—" if ratio is None else f"{(ratio - 1) * 100:+.1f}%",
            "—" if ratio is None else f"{ratio:.2f}×",
        ])
    return _table(TABLE_COLUMNS, rows)


def render_profile(results: Sequence[ConditionResult]) -> str:
    """Where one target pass's time goes, per layerline condition (milliseconds per pass)."""
    rows = []
    for r in results:
        s = r.stats
        if s is None or s.pass_ms is None:
            continue
        rows.append([r.condition.name, f"{s.pass_ms:.1f}", _cell(s.draft_ms, ".1f"),
                     _cell(s.verify_ms, ".1f"), _cell(s.link_ms, ".0f"), _cell(s.outside_ms, ".1f"),
                     _cell(s.tokens_per_pass, ".2f")])
    return _table(PROFILE_COLUMNS, rows)


def render_load(results: Sequence[ConditionResult]) -> str:
    """The concurrency axis: per condition and client count, the aggregate and what each client saw."""
    loaded = [r for r in results if r.load]
    if not loaded:
        return ""
    batched = any(level.mean_batch is not None for r in loaded for level in r.load)
    rows = []
    for r in loaded:
        for level in r.load:
            s = level.stats
            if s is None:
                failure = "failed: " + (level.error or "?").splitlines()[0][:60].replace("|", "/")
                rows.append([r.condition.name, str(level.clients), "0", failure,
                             *["—"] * (len(LOAD_COLUMNS) - 4 + batched)])
                continue
            same = _cell(s.same_text, ".0%") + (" (errors)" if level.error else "")
            row = [r.condition.name, str(level.clients), str(s.requests), f"{s.aggregate_tokens_per_s:.2f}",
                   _cell(level.vs_one_client, ".2f") + ("×" if level.vs_one_client is not None else ""),
                   f"{s.client_decode_tokens_per_s:.2f}", f"{s.ttft_p50_s:.3f}", f"{s.ttft_p90_s:.3f}", same]
            rows.append(row + ([_cell(level.mean_batch, ".2f")] if batched else []))
    return _table((*LOAD_COLUMNS, *((MEAN_BATCH_COLUMN,) if batched else ())), rows)


def _windows(runs: list[list[int]]) -> str:
    """[[4, 3], [0, 16]] -> `4×3 0×16`."""
    return " ".join(f"{w}×{n}" for w, n in runs)


def render_overlap(results: Sequence[ConditionResult]) -> str:
    """Per drafting condition: windows drafted during a pass and used or discarded, and the
    windows each request chose step by step (`w×steps`, in order)."""
    rows = []
    for r in results:
        if not r.condition.draft or r.condition.engine != "layerline" or not r.samples:
            continue
        usages = [s.speculative for s in r.samples]
        used = sum(int(u.get("overlap_hits") or 0) for u in usages)
        discarded = sum(int(u.get("overlap_misses") or 0) for u in usages)
        share = f"{used / (used + discarded):.0%}" if used + discarded else "—"
        timeline = "; ".join(_windows(u.get("windows") or []) for u in usages)
        rows.append([r.condition.name, r.condition.overlap, str(used), str(discarded), share,
                     timeline[:400].replace("|", "/")])
    if not rows:
        return ""
    return _table(("condition", "overlap", "prepared used", "discarded", "used", "windows per request"), rows)


def render_trees(results: Sequence[ConditionResult]) -> str:
    """Per tree condition: nodes sent and the accepted path per tree step, and acceptance by
    depth (`usage.speculative.tree`, over every measured request)."""
    rows = []
    for r in results:
        trees = [s.speculative.get("tree") for s in r.samples if s.speculative.get("tree")]
        if r.condition.tree is None or not trees:
            continue
        steps = sum(t["steps"] for t in trees)
        nodes = sum(t["nodes"] for t in trees)
        paths = sum(path * count for t in trees for path, count in t["paths"])
        width = max(len(t["depths_drafted"]) for t in trees)
        drafted = [sum(t["depths_drafted"][d] for t in trees if d < len(t["depths_drafted"]))
                   for d in range(width)]
        accepted = [sum(t["depths_accepted"][d] for t in trees if d < len(t["depths_accepted"]))
                    for d in range(width)]
        by_depth = " ".join(f"{a / n:.0%}" for a, n in zip(accepted, drafted, strict=True) if n)
        rows.append([r.condition.name, str(steps), f"{nodes / steps:.1f}", f"{paths / steps:.2f}", by_depth])
    if not rows:
        return ""
    return _table(("condition", "tree steps", "nodes per step", "accepted path per step",
                   "acceptance by depth"), rows)


def _part_order(name: str) -> tuple[int, int, str]:
    """Parts in the order a pass runs them: draft, stage 0, each hop and stage down, head, decide."""
    if name.startswith("stage"):
        return (1, 2 * int(name.removeprefix("stage")), name)
    if name.startswith("hop"):
        return (1, 2 * int(name.removeprefix("hop").split("_")[0]) + 1, name)
    return ({"draft": 0, "head": 2, "decide": 3, "target": 4}.get(name, 5), 0, name)


def render_stage_profile(results: Sequence[ConditionResult]) -> str:
    """Stage 0's trace of the measured passes: each stage's compute and each hop, in ms per pass."""
    profiled = [r for r in results if r.profile]
    if not profiled:
        return ""
    parts = sorted({part for r in profiled for part in r.profile}, key=_part_order)
    columns = ["condition", *(f"{p.replace('_', '→')} ms" for p in parts)]
    rows = [[r.condition.name, *(_cell(r.profile.get(p), ".2f") for p in parts)] for r in profiled]
    return _table(columns, rows)


def goal_lines(results: Sequence[ConditionResult]) -> list[str]:
    """How the run compares with the goals the issue set (reported, never asserted)."""
    rel = ratios(results)
    lines = []

    def verdict(ok: bool, miss: str) -> str:
        return "met" if ok else f"missed by {miss}"

    for r in results:
        c = r.condition
        if c.engine == "layerline" and c.stages == 2 and not c.draft and not c.delay_ms and rel.get(c.name):
            ratio = rel[c.name] or 0.0
            lines.append(f"- 2-stage split on loopback ≥ {SPLIT_GOAL:.2f}× single: {ratio:.3f}× — "
                         f"{verdict(ratio >= SPLIT_GOAL, f'{(SPLIT_GOAL - ratio) * 100:.1f} points')}")
    for delay in sorted({r.condition.delay_ms for r in results if r.condition.delay_ms}):
        drafted = [r for r in results if r.condition.engine == "layerline" and r.condition.stages == 2
                   and r.condition.draft and r.condition.delay_ms == delay and rel.get(r.condition.name)]
        if drafted:
            best = max(drafted, key=lambda r: rel[r.condition.name] or 0.0)
            ratio = rel[best.condition.name] or 0.0
            lines.append(f"- speculation over 2 stages with {delay:g} ms links ≥ {SPECULATION_GOAL:g}× the "
                         f"split: best {best.condition.name} {ratio:.2f}× — "
                         f"{verdict(ratio >= SPECULATION_GOAL, f'{SPECULATION_GOAL - ratio:.2f}×')}")
    lines += load_goal_lines(results)
    for r in results:
        s = r.stats
        if s is None or s.expected_tokens_per_pass is None or s.tokens_per_pass is None:
            continue
        off = s.tokens_per_pass / s.expected_tokens_per_pass - 1
        lines.append(f"- {r.condition.name}: {s.tokens_per_pass:.2f} tok/pass vs "
                     f"{s.expected_tokens_per_pass:.2f} expected at a = {s.position_accept_rate:.1%} "
                     f"({off:+.1%}; goal within "
                     f"±{PASS_GOAL:.0%}) — {verdict(abs(off) <= PASS_GOAL, f'{abs(off) - PASS_GOAL:.1%}')}")
    return lines


def load_goal_lines(results: Sequence[ConditionResult]) -> list[str]:
    """The concurrency goals: the 2-stage split's scaling and TTFT under load, and answers left unchanged."""
    lines = []
    for r in results:
        c = r.condition
        if not r.load or c.engine != "layerline" or c.stages != 2 or c.draft or c.delay_ms:
            continue
        by_clients = {level.clients: level for level in r.load if level.stats is not None}
        for clients, goal in CLIENT_GOALS.items():
            ratio = by_clients[clients].vs_one_client if clients in by_clients else None
            if ratio is not None:
                verdict = "met" if ratio >= goal else f"missed by {goal - ratio:.2f}×"
                lines.append(f"- {c.name}, {clients} clients ≥ {goal:g}× the aggregate tok/s of 1: "
                             f"{ratio:.2f}× — {verdict}")
        clients, goal = TTFT_GOAL
        if clients in by_clients and 1 in by_clients:
            many, one = by_clients[clients].stats, by_clients[1].stats
            assert many is not None and one is not None
            ratio = many.ttft_p50_s / one.ttft_p50_s if one.ttft_p50_s else float("inf")
            lines.append(f"- {c.name}, p50 TTFT at {clients} clients ≤ {goal:g}× 1 client's: "
                         f"{many.ttft_p50_s:.2f} s vs {one.ttft_p50_s:.2f} s ({ratio:.2f}×) — "
                         + ("met" if ratio <= goal else f"missed by {ratio - goal:.2f}×"))
    compared = differ = 0
    for r in results:
        for level in r.load:
            if level.clients > 1 and level.stats is not None and level.stats.same_text is not None:
                n = level.stats.requests
                compared += n
                differ += len(level.stats.mismatches)
    if compared:
        lines.append(f"- every concurrent answer equal to its solo greedy answer: {compared - differ} of "
                     f"{compared} — " + ("met" if not differ else f"missed by {differ}"))
    return lines


def render_report(settings: BenchSettings, results: Sequence[ConditionResult]) -> str:
    """All the Markdown the command prints and writes to table.md."""
    methods = sorted({f"{r.link_method} ({r.link_note})" for r in results
                      if r.link_method and r.link_method != "loopback"})
    parts = [
        f"serve benchmark: {settings.target}" + (f", draft {settings.draft}" if settings.draft else "")
        + f"; {len(settings.prompts)} prompts × {settings.runs} runs, {settings.max_tokens} tokens max, "
        f"greedy, {settings.warmup} warm-up" + ("; stages pinned to a core each" if settings.pin else "")
        + (f"; clients {', '.join(map(str, settings.client_levels))}" if settings.client_levels else "")
        + (f", --max-batch {settings.max_batch}" if settings.max_batch is not None else "")
        + (f", --lanes {settings.lanes}" if settings.lanes is not None else ""),
        "",
        render_table(results),
        "",
    ]
    if methods:
        parts += ["Delayed links: " + "; ".join(methods), ""]
    parts += ["Where a target pass's time goes (ms per pass, measured requests):", "",
              render_profile(results), ""]
    stage_profile = render_stage_profile(results)
    if stage_profile:
        parts += ["The same passes by stage and hop, from stage 0's trace (ms per pass; `target` is the "
                  "whole pass, `hopA→B` the link both ways with (de)serialization and queueing):", "",
                  stage_profile, ""]
    overlap = render_overlap(results)
    if overlap:
        parts += ["Windows drafted during a pass (used when every draft and the guessed next token stood), "
                  "and the windows chosen step by step (`w×steps`; 0: a plain step):", "", overlap, ""]
    trees = render_trees(results)
    if trees:
        parts += ["Token trees (each verified in one pass; nodes drafted, the accepted path, and how often "
                  "the path reached each depth once the tree did):", "", trees, ""]
    load = render_load(results)
    if load:
        parts += ["Many clients at once (each sends every prompt in turn, all released together; 1 client: "
                  "the measured runs above; aggregate: every token over the first request to the last token; "
                  "same text: answers equal to the 1-client answer of their prompt):", "", load, ""]
    goals = goal_lines(results)
    if goals:
        parts += ["Goals:", *goals, ""]
    failed = [r for r in results if r.error]
    for r in failed:
        parts.append(f"FAILED {r.condition.name}: {r.error}")
    for r in results:
        for level in r.load:
            if level.error:
                parts.append(f"FAILED {r.condition.name} with {level.clients} clients: {level.error}")
    return "\n".join(parts).rstrip() + "\n"


def png_bytes(fig: Any) -> bytes:
    """A matplotlib figure as the PNG the reports save."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"platform": platform.platform(), "cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "python": platform.python_version(), "layerline": v("layerline"), "mlx": v("mlx"),
            "mlx_lm": v("mlx-lm")}


def write_json(path: Path, settings: BenchSettings, results: Sequence[ConditionResult],
               command: Sequence[str]) -> None:
    """Settings, machine, and every condition's figures and raw requests."""
    rel = ratios(results)
    body = {
        "command": list(command), "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "goals": goal_lines(results),
        "conditions": [{**r.to_json(), "vs_baseline": rel.get(r.condition.name)} for r in results],
    }
    write_atomic(path, json.dumps(body, indent=2) + "\n")


def write_chart(path: Path, results: Sequence[ConditionResult], title: str) -> None:
    """Median tok/s per condition (bars), each labelled with its ratio to its baseline."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.stats is not None]
    rel = ratios(results)
    names = [r.condition.name for r in shown]
    speeds = [r.stats.tokens_per_s for r in shown if r.stats]
    ttfts = [r.stats.ttft_s for r in shown if r.stats]
    colors = ["tab:gray" if r.condition.engine == "llama.cpp" else "tab:green" if r.condition.tree else
              "tab:orange" if r.condition.draft else "tab:blue" for r in shown]
    height = max(2.5, 0.42 * len(shown) + 1.2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, height), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 1.2]})
    ys = list(range(len(shown)))[::-1]
    left.barh(ys, speeds, color=colors)
    for y, r, speed in zip(ys, shown, speeds, strict=True):
        ratio = rel.get(r.condition.name)
        label = f" {speed:.2f}" + (f"  ({ratio:.2f}× {r.condition.baseline})" if ratio else "")
        left.text(speed, y, label, va="center", fontsize=8)
    left.set_yticks(ys, names, fontsize=8)
    left.set_xlabel("median tok/s (completion tokens / wall time)")
    left.set_xlim(0, max(speeds, default=1) * 1.45)
    right.barh(ys, ttfts, color=colors)
    right.set_xlabel("median time to first token (s)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomic(path, png_bytes(fig))
    plt.close(fig)


def write_load_chart(path: Path, results: Sequence[ConditionResult], title: str) -> None:
    """Aggregate tok/s and p50 time to first token against the number of clients, a line per condition."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    counts: set[int] = set()
    for r in results:
        levels = [level for level in r.load if level.stats is not None]
        if not levels:
            continue
        xs = [level.clients for level in levels]
        counts.update(xs)
        style = {"linestyle": "--" if r.condition.draft else "-", "marker": "o"}
        left.plot(xs, [level.stats.aggregate_tokens_per_s for level in levels if level.stats],
                  label=r.condition.name, **style)
        right.plot(xs, [level.stats.ttft_p50_s for level in levels if level.stats], label=r.condition.name,
                   **style)
    for ax, label in ((left, "aggregate tok/s (all clients' tokens / wall time)"),
                      (right, "p50 time to first token (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(counts), [str(c) for c in sorted(counts)])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomic(path, png_bytes(fig))
    plt.close(fig)


def write_report(output: Path, settings: BenchSettings, results: Sequence[ConditionResult],
                 command: Sequence[str]) -> str:
    """Write table.md, results.json and chart.png (and concurrency.png) into `output`; return the Markdown."""
    output.mkdir(parents=True, exist_ok=True)
    markdown = render_report(settings, results)
    write_atomic(output / "table.md", markdown)
    write_json(output / "results.json", settings, results, command)
    write_chart(output / "chart.png", results, f"layerline bench serve: {Path(settings.target).name}")
    if any(r.load for r in results):
        write_load_chart(output / "concurrency.png", results,
                         f"layerline bench serve: {Path(settings.target).name}, many clients at once")
    return markdown
