"""`layerline pkg job`: run `layerline pkg build … --publish` on Hugging Face Jobs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerline.errors import PublishError
from layerline.packager.publish import check_repo_id, hub_errors, hub_token
from layerline.packager.source import is_hub_id
from layerline.packager.weights import parse_format

if TYPE_CHECKING:
    from huggingface_hub import HfApi

# huggingface_hub's own image for `hf jobs uv run`: Debian with uv and Python 3.12.
DEFAULT_IMAGE = "ghcr.io/astral-sh/uv:python3.12-bookworm"
OUTPUT_DIR = "/tmp/package"
TOKEN_PLACEHOLDER = "<HF_TOKEN>"
# What huggingface_hub's jobs API parses: whole seconds, or a number with a unit.
TIMEOUT_RE = re.compile(r"^(\d+|\d+(\.\d+)?[smhd])$")
JOB_HINTS = {
    401: "run `hf auth login` with a token allowed to start Jobs (fine-grained tokens: enable Jobs)",
    402: "Hugging Face Jobs are billed: use a PRO account or an org with credits "
    "(https://huggingface.co/settings/billing)",
    400: "check --flavor (`hf jobs hardware` lists them) and --timeout (e.g. 90m, 2h)",
}


@dataclass(frozen=True)
class BuildJobRequest:
    """A package build to run on Hugging Face Jobs, and the Hub repo it publishes to."""

    source: str  # Hub repo id, or REPO:FILE.gguf / REPO:QUANT for one GGUF file of a repo
    publish: str  # ORG/NAME
    flavor: str = "cpu-upgrade"
    quantize: str = "4bit"
    group_size: int = 32
    private: bool = False
    timeout: str = "2h"
    layerline_spec: str = "layerline"  # pip requirement the job installs: name, git URL or wheel URL
    python: str = "3.12"
    image: str = DEFAULT_IMAGE


@dataclass(frozen=True)
class JobSubmission:
    """What was (or would be) sent to the jobs API, and the job it started."""

    spec: dict[str, Any]  # keyword arguments of HfApi.run_job, secrets shown as placeholders
    job_id: str | None
    url: str | None


def build_command(request: BuildJobRequest) -> list[str]:
    """The command the job's container runs: `uv run` installs layerline, then builds and publishes."""
    install = ["uv", "run", "--no-project", "--python", request.python, "--with", request.layerline_spec]
    build = ["layerline", "pkg", "build", request.source, "-o", OUTPUT_DIR]
    options = ["--quantize", request.quantize, "--group-size", str(request.group_size)]
    publish = ["--publish", request.publish, *(["--private"] if request.private else [])]
    return [*install, *build, *options, *publish]


def job_spec(request: BuildJobRequest, token: str = TOKEN_PLACEHOLDER) -> dict[str, Any]:
    """Keyword arguments for HfApi.run_job; the token goes in as a secret, never on the command line."""
    return {
        "image": request.image,
        "command": build_command(request),
        "secrets": {"HF_TOKEN": token},
        "flavor": request.flavor,
        "timeout": request.timeout,
    }


def check_request(request: BuildJobRequest) -> None:
    """Raise PublishError (or LayerlineError) for a request the job would only reject after it starts."""
    check_repo_id(request.publish)
    parse_format(request.quantize, request.group_size)
    if Path(request.source).expanduser().exists():
        raise PublishError(
            f"job source {request.source!r} is a local path; a job runs on Hugging Face and cannot read it",
            hint="upload the model to the Hub and pass its repo id (or REPO:FILE.gguf), or build here and "
            "run `layerline pkg publish`; if you meant the Hub repo, run from a folder without that path",
        )
    if not is_hub_id(request.source):
        raise PublishError(
            f"job source {request.source!r} is not a Hub reference",
            hint="pass a Hub repo id (ORG/NAME), or ORG/NAME:FILE.gguf for one GGUF file of a repo",
        )
    if not TIMEOUT_RE.match(request.timeout):
        raise PublishError(
            f"job timeout {request.timeout!r} is not a duration",
            hint="pass seconds or a number with s, m, h or d, e.g. 5400, 90m, 2h",
        )
    if not request.flavor:
        raise PublishError("job flavor is empty", hint="pass --flavor, e.g. cpu-upgrade (`hf jobs hardware`)")


def submit_build_job(
    request: BuildJobRequest, *, dry_run: bool = False, api: HfApi | None = None
) -> JobSubmission:
    """Start a Hugging Face Job that builds and publishes a package; with dry_run, only describe it."""
    check_request(request)
    shown = job_spec(request)
    if dry_run:
        return JobSubmission(spec=shown, job_id=None, url=None)
    if api is None:
        import huggingface_hub

        api = huggingface_hub.HfApi()
    token = hub_token(api)
    with hub_errors(f"submitting a build job for {request.publish}", JOB_HINTS):
        job = api.run_job(**job_spec(request, token))
    return JobSubmission(spec=shown, job_id=job.id, url=job.url)
