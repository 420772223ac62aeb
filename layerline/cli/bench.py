"""`layerline bench …`: measure decode and serving speed on this machine."""

from __future__ import annotations

import os
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
    mlx_lm: Annotated[bool, typer.Option(help="Also run a bare mlx-lm loop on the same weights.")] = True,
    llama_bench: Annotated[Path | None, typer.Option(help="llama.cpp's llama-bench binary: also run it on the same GGUF and threads.")] = None,
    llama_threads: Annotated[int | None, typer.Option(help="llama-bench -t (default: the threads layerline's CPU kernel uses).")] = None,
    profile: Annotated[bool, typer.Option(help="Also time one decoded token per op class (packed weights), with mlx's ops and with the fused ones.")] = False,
) -> None:
    """Prefill and decode tok/s per weight format, beside a bare mlx-lm loop on the same weights."""
    from layerline.runtime.bench.decode import BENCH_FORMATS, auto_choice, render_rows
    from layerline.runtime.bench.decode import bench_decode as run_bench
    from layerline.runtime.bench.llama_bench import render_llama_bench, run_llama_bench
    from layerline.runtime.bench.models import BENCH_CACHE, resolve_gguf, resolve_package
    from layerline.runtime.model.blas import load_fast_blas
    from layerline.runtime.model.cpu_kernel import cpu_kernel

    log_to_stderr(quiet=True)
    package = resolve_package(model, BENCH_CACHE.expanduser())
    gguf = resolve_gguf(model) if llama_bench is not None else None  # refused before any measuring
    formats = tuple(w.value for w in weights) if weights else BENCH_FORMATS
    rows = run_bench(package, formats, prompt_tokens=prompt_tokens, decode_tokens=tokens,
                     repeats=repeats, mlx_lm=mlx_lm)
    llama = None
    if llama_bench is not None and gguf is not None:
        threads = llama_threads or cpu_kernel().threads or os.cpu_count() or 1
        llama = run_llama_bench(llama_bench, gguf, threads=threads, prompt_tokens=prompt_tokens,
                                tokens=tokens, repeats=repeats)
    # Plain text, not a rich table: it must not wrap when piped into a file or a doc.
    typer.echo(f"decode benchmark: {package}, {prompt_tokens} prompt tokens, {tokens} decoded, "
               f"best of {repeats}")
    typer.echo(render_rows(rows))
    if llama is not None:
        typer.echo(render_llama_bench(llama, {r.weights: r.layerline_decode_tps for r in rows}))
    if profile:
        from layerline.packager.package import LayerPackage
        from layerline.runtime.bench.decode import bench_prompt
        from layerline.runtime.bench.token_profile import profile_both, render_profiles
        from layerline.runtime.model.tokenizer import load_tokenizer

        prompt = bench_prompt(load_tokenizer(LayerPackage.open(package)), prompt_tokens)
        typer.echo(f"one decoded token per op class (packed weights, context {prompt_tokens}+{tokens // 2}):")
        typer.echo(render_profiles(profile_both(package, prompt, tokens)))
    typer.echo(f"{load_fast_blas().describe()} {cpu_kernel().describe()}")
    typer.echo(f"--weights auto here: {auto_choice(package).describe()}")


@bench_app.command("kernels")
def bench_kernels(
    shape: Annotated[str, typer.Option(help="Weight shape OUTxIN (default: Qwen2.5-1.5B's MLP).")] = "8960x1536",
    bits: Annotated[int, typer.Option(help="Packed bits per weight.")] = 4,
    group_size: Annotated[int, typer.Option(help="Weights per scale and bias.")] = 64,
    rows: Annotated[list[int] | None, typer.Option(help="Rows of x (repeat; default 1, 8, 16, 32).")] = None,
    working_set_mib: Annotated[int, typer.Option(help="Packed weights cycled through, past the CPU's caches.")] = 384,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Folder for table.md, results.json, chart.png.")] = None,
    package: Annotated[list[str] | None, typer.Option(help="Package folder, GGUF or shipped name (repeat): also measure the integer path's error on it (int8 and int16 x: mean KL against f32 x, greedy tokens).")] = None,
) -> None:
    """The packed-weight product on this CPU: layerline's kernel against the memory's read bandwidth, mlx's kernel and f32 BLAS."""
    import time

    from layerline.errors import LayerlineError
    from layerline.runtime.bench.kernels import DEFAULT_ROWS, write_kernel_report
    from layerline.runtime.bench.kernels import bench_kernels as run_bench

    log_to_stderr(quiet=True)
    try:
        n, k = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        raise LayerlineError(f"--shape {shape!r} is not OUTxIN", hint="e.g. --shape 8960x1536") from None
    from layerline.runtime.model.cpu_kernel import SUPPORTED_BITS, SUPPORTED_GROUPS

    if bits not in SUPPORTED_BITS or group_size not in SUPPORTED_GROUPS or k % group_size:
        raise LayerlineError(f"cannot pack {shape} at {bits} bits in groups of {group_size}",
                             hint=f"bits in {SUPPORTED_BITS}, groups in {SUPPORTED_GROUPS} dividing IN")
    bench = run_bench(n, k, bits=bits, group_size=group_size, rows=tuple(rows or DEFAULT_ROWS),
                      working_set_bytes=working_set_mib << 20)
    folder = output or Path("bench-results") / time.strftime("kernels-%Y%m%d-%H%M%S")
    typer.echo(write_kernel_report(folder, bench, sys.argv))
    if package:
        from layerline.atomic_write import write_atomic
        from layerline.runtime.bench.integer_fidelity import measure_integer_fidelity, render_integer_fidelity
        from layerline.runtime.bench.models import BENCH_CACHE, resolve_package

        results = [r for p in package for r in measure_integer_fidelity(resolve_package(p, BENCH_CACHE.expanduser()))]
        write_atomic(folder / "integer-fidelity.json", render_integer_fidelity(results, as_json=True))
        typer.echo(render_integer_fidelity(results))
    typer.echo(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    typer.echo(f"wrote {folder}/table.md, results.json, chart.png" + (", integer-fidelity.json" if package else ""))


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
    tree: Annotated[list[str] | None, typer.Option(help="Also draft token trees: auto (sized by cost) or DEPTH,WIDTH[,NODES] (repeat), each a condition beside the chains.")] = None,
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
    clients: Annotated[str, typer.Option(help="Concurrent clients, comma-separated (e.g. 1,4,8,16): beyond 1, each layerline condition also serves that many at once.")] = "1",
    max_batch: Annotated[int | None, typer.Option(help="Stage 0's --max-batch (requests decoding together), passed only when given.")] = None,
    lanes: Annotated[int | None, typer.Option(help="Stage 0's --lanes (batches in flight through the stages), passed only when given.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Folder for table.md, results.json, chart.png (and concurrency.png).")] = None,
) -> None:
    """Serve one model under a matrix of conditions and compare them: split, draft, delayed links, many clients, llama.cpp."""
    import time

    from layerline.errors import LayerlineError
    from layerline.runtime.bench.report import render_report, write_report
    from layerline.runtime.bench.serve import DEFAULT_PROMPTS, Bench, BenchSettings, build_matrix

    log_to_stderr(quiet=False)
    try:
        client_counts = tuple(int(c) for c in clients.split(",") if c.strip())
    except ValueError:
        raise LayerlineError(f"--clients {clients!r} is not a list of counts", hint="e.g. --clients 1,4,8,16") from None
    settings = BenchSettings(
        target=target, draft=draft, stages=tuple(stages or (2, 3)), draft_stages=tuple(draft_stages or (2,)),
        windows=tuple(window or (4, 8, 16)), adaptive=adaptive, auto=auto,
        overlaps=tuple(overlap or ("off",)), trees=tuple(tree or ()), delays_ms=tuple(link_delay_ms or (0.0,)),
        link_method=link_method, pin=pin, prompts=tuple(prompt or DEFAULT_PROMPTS), max_tokens=max_tokens, runs=runs,
        warmup=warmup, weights=weights.value, quantize=quantize.value, llama_server=llama_server,
        llama_threads=llama_threads, start_timeout_s=start_timeout, clients=client_counts, max_batch=max_batch,
        lanes=lanes)
    folder = output or Path("bench-results") / time.strftime("serve-%Y%m%d-%H%M%S")
    conditions = build_matrix(settings)
    err.print(f"{len(conditions)} conditions: {', '.join(c.name for c in conditions)}", highlight=False)
    done: list = []

    def save(result: object) -> None:  # the report so far, after every condition
        done.append(result)
        write_report(folder, settings, done, sys.argv)

    results = Bench(settings, folder).run(conditions, on_result=save)  # the last save wrote them all
    typer.echo(render_report(settings, results))
    typer.echo(f"wrote {folder}/table.md, results.json, chart.png"
               + (", concurrency.png" if (folder / "concurrency.png").exists() else ""))
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
