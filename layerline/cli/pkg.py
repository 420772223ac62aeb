"""`layerline pkg …`: build, inspect, verify, calibrate and publish layer packages, or build on HF Jobs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from layerline.runtime.decode.calibration_prompts import DEFAULT_MAX_TOKENS

from .options import (
    DEFAULT_WINDOW,
    AsJsonOpt,
    GroupSizeOpt,
    InitialWindowOpt,
    MaxWindowOpt,
    MinWindowOpt,
    PackageArg,
    PackageFormatOpt,
    PrivateOpt,
    QuietOpt,
    RevisionOpt,
    WeightsChoice,
    WeightsOpt,
    WindowPolicyChoice,
    WindowPolicyOpt,
)
from .output import out
from .stage import stage_cache

CalibrationTokensOpt = Annotated[int, typer.Option(
    "--max-tokens", min=1, help="Continuation tokens the target writes per calibration prompt.")]
DraftCacheOpt = Annotated[Path | None, typer.Option(
    "--cache-dir", help="Where stage 0 caches drafts built from GGUF or Hub references (default: config, "
                        "else ~/.cache/layerline/stage); nothing is fetched.")]

pkg_app = typer.Typer(no_args_is_help=True,
                      help="Build, inspect, verify, calibrate and publish layer packages.")


@pkg_app.command("build")
def pkg_build(
    source: Annotated[str, typer.Argument(help="GGUF file, safetensors folder, or Hub repo id.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Package folder to write.")],
    quantize: PackageFormatOpt = None,
    group_size: GroupSizeOpt = 32,
    fidelity: Annotated[bool, typer.Option(
        help="Measure the package's logits against the source's in float32 (needs memory for the "
             "model in f32).")] = True,
    force: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
    model_id: Annotated[str | None, typer.Option(help="Model id (default: from source).")] = None,
    draft_model: Annotated[
        list[str] | None, typer.Option(help="Draft model reference (repeat for several); `ngram` declares prompt-lookup drafting, no model.")
    ] = None,
    strategy_name: Annotated[
        list[str] | None, typer.Option(help="Name of each --draft-model strategy, in order.")
    ] = None,
    default_strategy: Annotated[str | None, typer.Option(help="Default strategy name.")] = None,
    window_policy: WindowPolicyOpt = WindowPolicyChoice(DEFAULT_WINDOW.policy),
    initial_window: InitialWindowOpt = DEFAULT_WINDOW.initial,
    min_window: MinWindowOpt = DEFAULT_WINDOW.min,
    max_window: MaxWindowOpt = DEFAULT_WINDOW.max,
    calibrate: Annotated[bool, typer.Option(
        help="Measure each strategy's acceptance on layerline's calibration prompts and store it "
             "(as `pkg calibrate` does).")] = False,
    publish: Annotated[str | None, typer.Option(help="Also upload to this Hub repo.")] = None,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Turn a model into a layer package."""
    from layerline.errors import LayerlineError
    from layerline.packager.build import BuildOptions, build_package
    from layerline.packager.inspect import describe_fidelity
    from layerline.packager.speculative import DraftSpec
    from layerline.packager.window_spec import WindowSpec

    window = WindowSpec(window_policy.value, initial_window, min_window, max_window)
    names = strategy_name or []
    drafts = [DraftSpec(reference=ref, name=names[i] if i < len(names) else None,
                        window_spec=window)
              for i, ref in enumerate(draft_model or [])]
    if calibrate and not drafts:
        raise LayerlineError("--calibrate needs at least one --draft-model",
                             hint="add --draft-model DRAFT (or `ngram`), or drop --calibrate")
    options = BuildOptions(quantize=quantize.value if quantize else None, group_size=group_size,
                           fidelity=fidelity, force=force, model_id=model_id, drafts=drafts,
                           default_strategy=default_strategy, quiet=quiet)
    manifest = build_package(source, output, options)
    out.print(f"built {output} ({manifest.num_layers} layers, {len(manifest.files)} files)")
    if manifest.fidelity is not None:
        out.print(f"fidelity: {describe_fidelity(manifest.fidelity)}")
    if calibrate:
        _calibrate(output, None, DEFAULT_MAX_TOKENS, None, WeightsChoice.auto, quiet)
    if publish:
        from layerline.packager.publish import publish_package

        url = publish_package(output, publish, private=private, revision=revision, quiet=quiet)
        out.print(f"published {publish}: {url}")


@pkg_app.command("inspect")
def pkg_inspect(package: PackageArg, as_json: AsJsonOpt = False) -> None:
    """Summarize a package: architecture, layers, sizes, quantization, tokenizer, speculation."""
    from layerline.packager.inspect import inspect_package, render_summary

    summary = inspect_package(package)
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        render_summary(summary, out)


@pkg_app.command("verify")
def pkg_verify(package: PackageArg, quiet: QuietOpt = False) -> None:
    """Recompute every file's sha256; exit 1 naming each bad or missing file."""
    from layerline.packager.verify import verify_package

    checked = verify_package(package, quiet=quiet)
    out.print(f"ok: {checked} files match {package}/model-package.json")


@pkg_app.command("calibrate")
def pkg_calibrate(
    package: PackageArg,
    strategy: Annotated[list[str] | None, typer.Option(
        help="Strategy to measure (repeat for several; default: every strategy).")] = None,
    max_tokens: CalibrationTokensOpt = DEFAULT_MAX_TOKENS,
    cache_dir: DraftCacheOpt = None,
    weights: WeightsOpt = WeightsChoice.auto,
    quiet: QuietOpt = False,
) -> None:
    """Measure how well each strategy's drafter predicts the model, and store it in the package."""
    _calibrate(package, strategy, max_tokens, cache_dir, weights, quiet)


def _calibrate(package: Path, strategies: list[str] | None, max_tokens: int, cache_dir: Path | None,
               weights: WeightsChoice, quiet: bool) -> None:
    from layerline.packager.inspect import describe_calibration
    from layerline.runtime.decode.calibration import calibrate_package
    from layerline.runtime.serve.config import load_config

    results = calibrate_package(package, strategies=strategies, max_tokens=max_tokens,
                                cache_dir=stage_cache(cache_dir, load_config()), weights=weights.value,
                                quiet=quiet)
    for name, calibration in results.items():
        out.print(f"calibrated {name}: {describe_calibration(calibration)}")


@pkg_app.command("publish")
def pkg_publish(
    package: PackageArg,
    repo_id: Annotated[str, typer.Argument(help="Hub repo, ORG/NAME.")],
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
) -> None:
    """Upload a verified package to the Hugging Face Hub in one commit."""
    from layerline.packager.publish import publish_package

    url = publish_package(package, repo_id, private=private, revision=revision)
    out.print(f"published {repo_id}: {url}")


class JobGroup(TyperGroup):
    """`pkg job SOURCE …` submits a build; `pkg job status JOB` and `pkg job logs JOB` follow one."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # A Hub source (ORG/NAME…) is never a subcommand's name, so anything else submits.
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["submit", *args]
        return super().parse_args(ctx, args)


job_app = typer.Typer(cls=JobGroup, no_args_is_help=True,
                      help="Build and publish a package on Hugging Face Jobs, and follow the job.")
pkg_app.add_typer(job_app, name="job")
JobIdArg = Annotated[str, typer.Argument(help="Job id, as `pkg job` printed it.")]
NamespaceOpt = Annotated[str | None, typer.Option(help="User or org the job runs under (default: yours).")]


@job_app.command("submit")
def pkg_job(
    source: Annotated[str, typer.Argument(help="Hub repo id (safetensors), or REPO:QUANT / REPO:FILE.gguf of a GGUF repo.")],
    publish: Annotated[str, typer.Option(help="Hub repo the job publishes to, ORG/NAME.")],
    flavor: Annotated[str, typer.Option(help="Hugging Face Jobs hardware flavor (`hf jobs hardware`).")] = "cpu-upgrade",
    quantize: PackageFormatOpt = None,
    group_size: GroupSizeOpt = 32,
    private: PrivateOpt = False,
    timeout: Annotated[str, typer.Option(help="Job timeout, e.g. 2h.")] = "2h",
    dry_run: Annotated[bool, typer.Option(help="Build the sdist and print the job, its hash included; upload and submit nothing.")] = False,
    layerline_spec: Annotated[str | None, typer.Option(
        help="pip requirement the job installs instead of this layerline's sdist (PyPI name, git or wheel URL).")] = None,
    wheel_repo: Annotated[str | None, typer.Option(
        help="Hub repo (ORG/NAME) the layerline sdist is uploaded to (default: --publish), under layerline-job/.")] = None,
) -> None:
    """Run `layerline pkg build` on Hugging Face Jobs, with this layerline, and publish the result."""
    from layerline.hf_jobs.job import BuildJobRequest, submit_build_job

    request = BuildJobRequest(source=source, publish=publish, flavor=flavor,
                              quantize=quantize.value if quantize else None, group_size=group_size,
                              private=private, timeout=timeout, layerline_spec=layerline_spec,
                              wheel_repo=wheel_repo)
    result = submit_build_job(request, dry_run=dry_run)
    if dry_run:
        out.print_json(json.dumps({**result.spec, "sdist": asdict(result.sdist) if result.sdist else None}))
    else:
        if result.sdist:
            out.print(f"uploaded {result.sdist.repo}/{result.sdist.path_in_repo} (sha256 {result.sdist.sha256})")
        out.print(f"job {result.job_id}: {result.url}")
        out.print(f"follow it: layerline pkg job logs {result.job_id} --follow")


@job_app.command("status")
def pkg_job_status(job_id: JobIdArg, namespace: NamespaceOpt = None) -> None:
    """Print a job's stage (RUNNING, COMPLETED, ERROR …), hardware and times."""
    from layerline.hf_jobs.follow import describe_job, job_status

    for line in describe_job(job_status(job_id, namespace=namespace)):
        out.print(line)


@job_app.command("logs")
def pkg_job_logs(
    job_id: JobIdArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    tail: Annotated[int | None, typer.Option(min=1, help="Only the last N lines.")] = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Print a job's log lines."""
    from layerline.hf_jobs.follow import job_logs

    for line in job_logs(job_id, follow=follow, tail=tail, namespace=namespace):
        out.print(line, markup=False, highlight=False)
