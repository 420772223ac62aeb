"""`layerline pkg job`: run `layerline pkg build … --publish` on Hugging Face Jobs.

The job installs the layerline that submits it: `pkg job` builds this installation's sdist
(hf_jobs/sdist.py), uploads it to the destination repo (or --wheel-repo) under
`layerline-job/SHA256-PREFIX/`, and the job's command downloads it, checks its sha256 and installs
it, building the CPU kernel in the container. --layerline-spec replaces all of that with a pip
requirement.
"""

from __future__ import annotations

import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerline.errors import PublishError, SourceError
from layerline.packager.hub_source import pick_gguf
from layerline.packager.publish import check_repo_id, hub_errors, hub_token, refuse_public_repo
from layerline.packager.source import is_hub_id
from layerline.packager.weights import parse_format

from .sdist import Sdist, build_sdist, find_layerline_source

if TYPE_CHECKING:
    from huggingface_hub import HfApi

# huggingface_hub's own image for `hf jobs uv run`: Debian bookworm with Python 3.12 and gcc, g++.
DEFAULT_IMAGE = "ghcr.io/astral-sh/uv:python3.12-bookworm"
TOKEN_PLACEHOLDER = "<HF_TOKEN>"
# Where in the wheel repo the sdist goes: one folder per content, so a job never meets another's.
SDIST_FOLDER = "layerline-job"
# Logs reach `pkg job logs` as they are written, not when a buffer fills.
JOB_ENV = {"PYTHONUNBUFFERED": "1"}
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

    source: str  # Hub repo id (safetensors), or REPO:FILE.gguf / REPO:QUANT for one GGUF file of a repo
    publish: str  # ORG/NAME
    flavor: str = "cpu-upgrade"
    quantize: str | None = None  # as `pkg build`: None is exact for a GGUF, 4bit otherwise
    group_size: int = 32
    private: bool = False
    timeout: str = "2h"
    # pip requirement the job installs instead of this installation's sdist (name, git or wheel URL).
    layerline_spec: str | None = None
    wheel_repo: str | None = None  # repo the sdist is uploaded to; None: the publish repo
    layerline_source: Path | None = None  # checkout the sdist is built from; None: find_layerline_source()
    image: str = DEFAULT_IMAGE


@dataclass(frozen=True)
class SdistUpload:
    """Where the job finds the layerline sdist, and the sha256 it checks before installing it."""

    repo: str
    path_in_repo: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class JobSubmission:
    """What was (or would be) sent to the jobs API, and the job it started."""

    spec: dict[str, Any]  # keyword arguments of HfApi.run_job, secrets shown as placeholders
    sdist: SdistUpload | None  # None when --layerline-spec names what to install
    job_id: str | None
    url: str | None


def sdist_upload(request: BuildJobRequest, sdist: Sdist) -> SdistUpload:
    """Where `sdist` goes for this request: the wheel repo (else the publish repo), by content."""
    path = f"{SDIST_FOLDER}/{sdist.sha256[:16]}/{sdist.path.name}"
    return SdistUpload(request.wheel_repo or request.publish, path, sdist.sha256, sdist.bytes)


def build_command(request: BuildJobRequest, sdist: SdistUpload | None) -> list[str]:
    """The job's command: a fresh venv, layerline installed in it, then `pkg build … --publish`."""
    q = shlex.quote
    lines = [
        'W="$(mktemp -d)"',
        'python3 -m venv "$W/venv"',
        'export PATH="$W/venv/bin:$PATH"',
        "pip install --quiet --upgrade pip cmake 'huggingface_hub>=0.34'",
        # The image has gcc but no cmake: the CPU kernel's build (setup.py) finds pip's cmake binary
        # on PATH (its `cmake` script cannot import itself inside pip's isolated build).
        "export PATH=\"$(python -c 'import cmake; print(cmake.CMAKE_BIN_DIR)'):$PATH\"",
    ]
    if request.layerline_spec:
        lines.append(f"pip install {q(request.layerline_spec)}")
    else:
        assert sdist is not None
        local = f'"$W"/{q(sdist.path_in_repo)}'
        lines += [
            f'hf download {q(sdist.repo)} {q(sdist.path_in_repo)} --local-dir "$W" >/dev/null',
            f"echo {q(sdist.sha256)}'  '{local} | sha256sum --check --strict -",
            f"pip install {local}",
        ]
    build = ["layerline", "pkg", "build", request.source, "-o", "$W/package"]
    if request.quantize:
        build += ["--quantize", request.quantize]
    build += ["--group-size", str(request.group_size), "--publish", request.publish]
    build += ["--private"] if request.private else []
    lines.append(" ".join(f'"{arg}"' if arg.startswith("$W") else q(arg) for arg in build))
    return ["sh", "-ec", "\n".join(lines)]


def job_spec(request: BuildJobRequest, sdist: SdistUpload | None, token: str = TOKEN_PLACEHOLDER
             ) -> dict[str, Any]:
    """Keyword arguments for HfApi.run_job; the token goes in as a secret, never on the command line."""
    return {
        "image": request.image,
        "command": build_command(request, sdist),
        "env": dict(JOB_ENV),
        "secrets": {"HF_TOKEN": token},
        "flavor": request.flavor,
        "timeout": request.timeout,
    }


def check_request(request: BuildJobRequest) -> None:
    """Raise PublishError (or LayerlineError) for a request the job would only reject after it starts."""
    check_repo_id(request.publish)
    if request.wheel_repo:
        check_repo_id(request.wheel_repo)
    if request.quantize:
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


def check_hub_source(source: str, api: HfApi) -> None:
    """Raise SourceError unless `source` is what a job can build: one GGUF file, or a safetensors repo."""
    reference, _, wanted = source.partition(":")
    repo_id, _, revision = reference.partition("@")
    with hub_errors(f"listing the files of {repo_id}"):
        files = api.list_repo_files(repo_id, revision=revision or None)
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if wanted:
        chosen = pick_gguf(files, wanted)
        if not chosen.lower().endswith(".gguf"):
            raise SourceError(f"{repo_id}:{chosen} is not a GGUF file",
                              hint=f"name one of its .gguf files: {', '.join(ggufs) or '(it has none)'}")
    elif "config.json" not in files:
        shown = f"{repo_id}:{ggufs[0]}" if ggufs else None
        raise SourceError(
            f"{repo_id} holds " + (f"{len(ggufs)} GGUF files and no config.json" if ggufs else
                                   "neither GGUF files nor a config.json with safetensors"),
            hint=f"name the file to build, e.g. {shown} or {repo_id}:Q4_K_M" if ggufs else
            "pass a repo with config.json and *.safetensors, or REPO:FILE.gguf of a GGUF repo",
        )


def submit_build_job(
    request: BuildJobRequest, *, dry_run: bool = False, api: HfApi | None = None
) -> JobSubmission:
    """Start a Hugging Face Job that builds and publishes a package; with dry_run, only describe it.

    A dry run builds the sdist (to show its hash) and touches no Hub; a real run checks the source
    and the token, then uploads the sdist and starts the job.
    """
    check_request(request)
    if not dry_run:
        if api is None:
            import huggingface_hub

            api = huggingface_hub.HfApi()
        token = hub_token(api)
        check_hub_source(request.source, api)
    with tempfile.TemporaryDirectory(prefix="layerline-sdist-") as tmp:
        sdist = None
        if not request.layerline_spec:
            built = build_sdist(request.layerline_source or find_layerline_source(), Path(tmp))
            sdist = sdist_upload(request, built)
        shown = job_spec(request, sdist)
        if dry_run:
            return JobSubmission(spec=shown, sdist=sdist, job_id=None, url=None)
        if sdist is not None:
            _upload_sdist(api, request, built, sdist)
    with hub_errors(f"submitting a build job for {request.publish}", JOB_HINTS):
        job = api.run_job(**job_spec(request, sdist, token))
    return JobSubmission(spec=shown, sdist=sdist, job_id=job.id, url=job.url)


def _upload_sdist(api: HfApi, request: BuildJobRequest, built: Sdist, sdist: SdistUpload) -> None:
    with hub_errors(f"uploading layerline's sdist to {sdist.repo}"):
        api.create_repo(sdist.repo, repo_type="model", private=request.private, exist_ok=True)
        if request.private:
            refuse_public_repo(api, sdist.repo)  # else the job would fail at its publish, billed
        api.upload_file(path_or_fileobj=str(built.path), path_in_repo=sdist.path_in_repo, repo_id=sdist.repo,
                        repo_type="model", commit_message=f"layerline: the sdist a pkg job installs "
                                                          f"({built.sha256[:16]})")
