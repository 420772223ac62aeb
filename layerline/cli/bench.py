"""`layerline bench …`: measure decode and serving speed on this machine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .options import QuantizeChoice, QuantizeOpt, WeightsChoice, WeightsOpt
from .output import err, log_to_stderr

bench_app = typer.Typer(no_args_is_help=True, help="Measure layerline's speed on this machine.")


@bench_app.command("decode")
def bench_decode(
    model: Annotated[str, typer.Argument(help="Package folder, GGUF file, shipped model name, or tiny-llama.")],
    weights: Annotated[
        list[WeightsChoice] | None, typer.Option(help="Formats to measure (default: all but auto).")
    ] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length.")] = 128,
    tokens: Annotated[int, typer.Option(help="Tokens to decode per run.")] = 64,
    repeats: Annotated[int, typer.Option(help="Runs per format; the best is kept.")] = 2,
) -> None:
    """Prefill and decode tok/s per weight format, beside a bare mlx-lm loop on the same weights."""
    from layerline.runtime.bench.decode import BENCH_FORMATS, auto_choice, render_rows
    from layerline.runtime.bench.decode import bench_decode as run_bench
    from layerline.runtime.bench.models import BENCH_CACHE, resolve_package
    from layerline.runtime.model.blas import load_fast_blas

    log_to_stderr(quiet=True)
    package = resolve_package(model, BENCH_CACHE.expanduser())
    formats = tuple(w.value for w in weights) if weights else BENCH_FORMATS
    rows = run_bench(package, formats, prompt_tokens=prompt_tokens, decode_tokens=tokens,
                     repeats=repeats)
    # Plain text, not a rich table: it must not wrap when piped into a file or a doc.
    typer.echo(f"decode benchmark: {package}, {prompt_tokens} prompt tokens, {tokens} decoded, "
               f"best of {repeats}")
    typer.echo(render_rows(rows))
    typer.echo(load_fast_blas().describe())
    typer.echo(f"--weights auto here: {auto_choice(package).describe()}")


@bench_app.command("serve")
def bench_serve(
    target: Annotated[str, typer.Argument(help="Target: package folder, GGUF file, shipped model name, or tiny-llama.")],
    draft: Annotated[str | None, typer.Option(help="Draft: package, GGUF, shipped name, or 'ngram'.")] = None,
    stages: Annotated[list[int] | None, typer.Option(help="Stage counts to split over (repeat; default 2 and 3).")] = None,
    draft_stages: Annotated[list[int] | None, typer.Option(help="Stage counts to speculate over (repeat; default 2).")] = None,
    window: Annotated[list[int] | None, typer.Option(help="Fixed draft windows (repeat; default 4, 8, 16).")] = None,
    adaptive: Annotated[bool, typer.Option(help="Also run the adaptive window.")] = True,
    auto: Annotated[bool, typer.Option(help="Also run the auto window (sized by measured cost).")] = False,
    overlap: Annotated[list[str] | None, typer.Option(help="off, overlap (draft during verify) or run-ahead (repeat; default off).")] = None,
    link_delay_ms: Annotated[list[float] | None, typer.Option(help="One-way delay of every stage link (repeat; default 0).")] = None,
    link_method: Annotated[str, typer.Option(help="auto (netem, else a delaying proxy), netem or proxy.")] = "auto",
    pin: Annotated[bool, typer.Option(help="Pin each stage process to a core of its own (one BLAS thread), as if on its own machine.")] = False,
    prompt: Annotated[list[str] | None, typer.Option(help="Prompt (repeat; default: three built in).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 128,
    runs: Annotated[int, typer.Option(help="Measured passes over the prompts.")] = 3,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per condition.")] = 1,
    weights: WeightsOpt = WeightsChoice.auto,
    quantize: QuantizeOpt = QuantizeChoice.q4,
    llama_server: Annotated[Path | None, typer.Option(help="llama.cpp's llama-server binary: also run it.")] = None,
    llama_threads: Annotated[int, typer.Option(help="llama-server -t.")] = 2,
    start_timeout: Annotated[float, typer.Option(help="Seconds a condition's servers may take to start.")] = 900,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Folder for table.md, results.json, chart.png.")] = None,
) -> None:
    """Serve one model under a matrix of conditions and compare them: split, draft, delayed links, llama.cpp."""
    import time

    from layerline.runtime.bench.report import render_report, write_report
    from layerline.runtime.bench.serve import DEFAULT_PROMPTS, Bench, BenchSettings, build_matrix

    log_to_stderr(quiet=False)
    settings = BenchSettings(
        target=target, draft=draft, stages=tuple(stages or (2, 3)), draft_stages=tuple(draft_stages or (2,)),
        windows=tuple(window or (4, 8, 16)), adaptive=adaptive, auto=auto,
        overlaps=tuple(overlap or ("off",)), delays_ms=tuple(link_delay_ms or (0.0,)),
        link_method=link_method, pin=pin, prompts=tuple(prompt or DEFAULT_PROMPTS), max_tokens=max_tokens, runs=runs,
        warmup=warmup, weights=weights.value, quantize=quantize.value, llama_server=llama_server,
        llama_threads=llama_threads, start_timeout_s=start_timeout)
    folder = output or Path("bench-results") / time.strftime("serve-%Y%m%d-%H%M%S")
    conditions = build_matrix(settings)
    err.print(f"{len(conditions)} conditions: {', '.join(c.name for c in conditions)}", highlight=False)
    done: list = []

    def save(result: object) -> None:  # the report so far, after every condition
        done.append(result)
        write_report(folder, settings, done, sys.argv)

    results = Bench(settings, folder).run(conditions, on_result=save)  # the last save wrote them all
    typer.echo(render_report(settings, results))
    typer.echo(f"wrote {folder}/table.md, results.json, chart.png")
    if any(r.error for r in results):
        raise typer.Exit(1)


@bench_app.command("transport")
def bench_transport(
    hidden: Annotated[int, typer.Option(help="Hidden size: a frame carries one position of this many f32.")] = 512,
    frames: Annotated[int, typer.Option(help="Round trips measured per condition.")] = 500,
    pause_ms: Annotated[float, typer.Option(help="Pause between frames, as between decode steps.")] = 5.0,
) -> None:
    """The floor of a hop: one frame through two hops and back (3 processes), gRPC streams vs TCP frames."""
    from layerline.runtime.bench.transport import bench_transport as run_bench
    from layerline.runtime.bench.transport import render_transport

    typer.echo(render_transport(run_bench(hidden=hidden, frames=frames, pause_ms=pause_ms)))
