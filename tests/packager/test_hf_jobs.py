"""Running a package build on Hugging Face Jobs. The Hub is out of reach here, so it is stubbed at
the HTTP layer (hub_stub.StubHub): huggingface_hub's real HfApi lists, uploads and starts the job."""

from __future__ import annotations

import hashlib
import inspect
import json

import huggingface_hub
import pytest
from huggingface_hub import HfApi
from typer.testing import CliRunner

from layerline.cli import app
from layerline.errors import LayerlineError, PublishError, SourceError
from layerline.hf_jobs.follow import describe_job, job_logs, job_status
from layerline.hf_jobs.job import BuildJobRequest, submit_build_job
from layerline.hf_jobs.sdist import find_layerline_source, is_layerline_source

from helpers import HF_TEST_TOKEN
from hub_stub import StubHub

SOURCE_REPO = "acme/Tiny-GGUF"
SOURCE = f"{SOURCE_REPO}:tiny.Q4_K_M.gguf"
PUBLISH = "acme/tiny-layers"


class NoHubApi:
    """An api that must not be used (dry runs)."""

    def __getattr__(self, name: str):
        raise AssertionError(f"dry run called HfApi.{name}")


@pytest.fixture
def hub(monkeypatch):
    # conftest turns the real Hub off (HF_HUB_OFFLINE=1); huggingface_hub reads that once, at
    # import, in whichever order a worker's files run: the stub is the Hub here, so it is on.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with StubHub(HF_TEST_TOKEN) as stub:
        stub.add_file(SOURCE_REPO, "tiny.Q4_K_M.gguf", b"GGUF" + bytes(60))
        stub.add_file(SOURCE_REPO, "tiny.Q8_0.gguf", b"GGUF" + bytes(60))
        stub.add_file(SOURCE_REPO, "README.md", b"# tiny")
        yield stub


def hub_api(hub: StubHub, token: str | None = HF_TEST_TOKEN) -> HfApi:
    return HfApi(endpoint=hub.url, token=token)


def request(**changes) -> BuildJobRequest:
    return BuildJobRequest(**({"source": SOURCE, "publish": PUBLISH} | changes))


def script(spec: dict) -> list[str]:
    """The lines of the job's shell script."""
    assert spec["command"][:2] == ["sh", "-ec"]
    return spec["command"][2].splitlines()


def nothing_uploaded(hub: StubHub) -> bool:
    return set(hub.repos) == {SOURCE_REPO} and hub.jobs == []


def test_dry_run_shows_image_command_env_flavor_timeout_and_the_sdist_it_uploads_never_the_token(logged_in):
    submission = submit_build_job(request(flavor="a10g-small", timeout="90m"), dry_run=True, api=NoHubApi())

    assert (submission.job_id, submission.url) == (None, None)
    spec, sdist = submission.spec, submission.sdist
    assert spec["image"] == "ghcr.io/astral-sh/uv:python3.12-bookworm"
    assert (spec["flavor"], spec["timeout"]) == ("a10g-small", "90m")
    assert spec["env"] == {"PYTHONUNBUFFERED": "1"}
    assert spec["secrets"] == {"HF_TOKEN": "<HF_TOKEN>"}
    assert HF_TEST_TOKEN not in json.dumps(spec)
    inspect.signature(HfApi.run_job).bind(None, **spec)

    assert sdist.repo == PUBLISH and len(sdist.sha256) == 64 and sdist.bytes > 10_000
    assert sdist.path_in_repo == f"layerline-job/{sdist.sha256[:16]}/layerline-0.1.0.tar.gz"
    lines = script(spec)
    local = f'"$W"/{sdist.path_in_repo}'
    assert f'hf download {PUBLISH} {sdist.path_in_repo} --local-dir "$W" >/dev/null' in lines
    assert f"echo {sdist.sha256}'  '{local} | sha256sum --check --strict -" in lines
    assert lines.index(f"pip install {local}") > lines.index(f"echo {sdist.sha256}'  '{local} | "
                                                             "sha256sum --check --strict -")
    # As `pkg build` does by default: a GGUF builds exact, with fidelity measured.
    assert lines[-1] == f'layerline pkg build {SOURCE} -o "$W/package" --group-size 32 --publish {PUBLISH}'


def test_the_same_sources_give_the_same_sdist_hash(logged_in):
    first = submit_build_job(request(), dry_run=True, api=NoHubApi())
    again = submit_build_job(request(), dry_run=True, api=NoHubApi())
    assert first.sdist == again.sdist and first.spec == again.spec


def test_the_sdist_is_built_from_the_checkout_this_layerline_runs_from(tmp_path):
    checkout = find_layerline_source()
    assert (checkout / "layerline" / "__init__.py").is_file() and is_layerline_source(checkout)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n')
    (tmp_path / "setup.py").write_text("")
    assert not is_layerline_source(tmp_path)


def test_dry_run_needs_no_token(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert submit_build_job(request(), dry_run=True, api=NoHubApi()).spec["command"][0] == "sh"


def test_quantize_private_wheel_repo_and_layerline_spec_reach_the_command():
    lines = script(submit_build_job(request(quantize="8bit", group_size=64, private=True,
                                            wheel_repo="acme/wheels"), dry_run=True).spec)
    assert lines[-1].endswith("--quantize 8bit --group-size 64 --publish acme/tiny-layers --private")
    assert any(line.startswith("hf download acme/wheels layerline-job/") for line in lines)

    wheel = "layerline @ https://example.org/layerline-0.1.0-py3-none-any.whl"
    submission = submit_build_job(request(layerline_spec=wheel), dry_run=True)
    assert submission.sdist is None
    lines = script(submission.spec)
    assert "pip install 'layerline @ https://example.org/layerline-0.1.0-py3-none-any.whl'" in lines
    assert not any(line.startswith(("hf download", "echo")) for line in lines)


def test_submit_uploads_the_sdist_then_runs_the_job_with_the_token_as_a_secret(hub, logged_in):
    dry = submit_build_job(request(), dry_run=True)
    submission = submit_build_job(request(), api=hub_api(hub))

    assert submission.job_id == "job1"
    assert submission.url == f"{hub.url}/jobs/someone/job1"
    assert submission.spec == dry.spec and submission.sdist == dry.sdist
    uploaded = hub.read(PUBLISH, submission.sdist.path_in_repo)
    assert hashlib.sha256(uploaded).hexdigest() == submission.sdist.sha256
    (sent,) = hub.jobs
    assert sent["command"] == dry.spec["command"]
    assert sent["secrets"] == {"HF_TOKEN": HF_TEST_TOKEN}
    assert (sent["flavor"], sent["timeoutSeconds"], sent["environment"]) == ("cpu-upgrade", 7200,
                                                                            {"PYTHONUNBUFFERED": "1"})
    assert HF_TEST_TOKEN not in json.dumps(sent["command"])


def test_a_missing_token_says_how_to_log_in_and_uploads_nothing(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PublishError, match="no Hugging Face token") as caught:
        submit_build_job(request(), api=hub_api(hub, token=None))
    assert "hf auth login" in caught.value.hint
    assert nothing_uploaded(hub)


@pytest.mark.parametrize(
    ("source", "expected", "hint"),
    [
        (SOURCE_REPO, "2 GGUF files and no config.json", f"{SOURCE_REPO}:tiny.Q4_K_M.gguf"),
        (f"{SOURCE_REPO}:README.md", "README.md is not a GGUF file", "tiny.Q4_K_M.gguf, tiny.Q8_0.gguf"),
        (f"{SOURCE_REPO}:Q2_K", "0 GGUF files match 'Q2_K'", "tiny.Q4_K_M.gguf, tiny.Q8_0.gguf"),
        ("acme/missing:x.gguf", "does not exist", "check the repo id"),
    ],
    ids=["repo-without-a-file", "not-a-gguf", "no-such-quant", "no-such-repo"],
)
def test_a_source_the_job_cannot_build_is_refused_naming_the_fix_before_uploading(
        hub, logged_in, source, expected, hint):
    with pytest.raises(LayerlineError, match=expected) as caught:
        submit_build_job(request(source=source), api=hub_api(hub))
    assert isinstance(caught.value, SourceError | PublishError)
    assert hint in caught.value.hint
    assert nothing_uploaded(hub)


def test_an_sdist_that_fails_to_build_names_the_error_and_the_fix_and_uploads_nothing(
        hub, logged_in, tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "layerline"\nversion = "0.1.0"\n')
    (tmp_path / "setup.py").write_text("raise SystemExit('error: setup.py is broken on purpose')\n")
    failed = "building layerline's sdist .* failed: .*broken on purpose"
    with pytest.raises(PublishError, match=failed) as caught:
        submit_build_job(request(layerline_source=tmp_path), api=hub_api(hub))
    assert "--layerline-spec" in caught.value.hint
    assert nothing_uploaded(hub)


def test_a_private_job_uploads_into_a_new_private_repo_and_refuses_an_existing_public_one(hub, logged_in):
    submit_build_job(request(private=True), api=hub_api(hub))
    assert PUBLISH in hub.private and len(hub.jobs) == 1

    hub.add_file("acme/public-layers", "README.md", b"# public")
    with pytest.raises(PublishError, match="already exists and is public") as caught:
        submit_build_job(request(private=True, publish="acme/public-layers"), api=hub_api(hub))
    assert "hf repos settings" in caught.value.hint
    assert set(hub.repos["acme/public-layers"]) == {"README.md"} and len(hub.jobs) == 1


def test_jobs_api_error_is_wrapped_with_the_billing_fix(hub, logged_in):
    hub.job_failure = 402
    with pytest.raises(PublishError, match="HTTP 402") as caught:
        submit_build_job(request(), api=hub_api(hub))
    assert PUBLISH in caught.value.message
    assert "billing" in caught.value.hint


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"source": "./tiny.gguf"}, "not a Hub reference"),
        ({"publish": "tiny-layers"}, "ORG/NAME"),
        ({"wheel_repo": "wheels"}, "ORG/NAME"),
        ({"timeout": "2 hours"}, "not a duration"),
        ({"timeout": "5400.5"}, "not a duration"),
        ({"quantize": "3bit"}, "unknown weight format"),
        ({"quantize": "4bit", "group_size": 48}, "group size 48"),
    ],
)
def test_requests_a_job_would_reject_are_refused_before_submitting(hub, logged_in, changes, expected):
    with pytest.raises(LayerlineError, match=expected):
        submit_build_job(request(**changes), api=hub_api(hub))
    assert nothing_uploaded(hub)


def test_a_local_file_is_refused_as_job_source(tmp_path, monkeypatch, logged_in):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")
    with pytest.raises(PublishError, match="is a local path"):
        submit_build_job(request(source="models/tiny.gguf"), api=NoHubApi())


def test_status_and_logs_follow_a_job_through_the_jobs_api(hub, logged_in):
    submit_build_job(request(), api=hub_api(hub))
    hub.job_stage, hub.job_log = "COMPLETED", ["built /tmp/x/package (30 layers)", "published acme/x"]

    info = job_status("job1", api=hub_api(hub))
    lines = describe_job(info)
    assert lines[0] == "job job1: COMPLETED"
    assert lines[1].startswith("flavor cpu-upgrade, created 2026-01-01 00:00:00")
    assert lines[2] == f"{hub.url}/jobs/someone/job1"
    assert list(job_logs("job1", api=hub_api(hub))) == hub.job_log
    with pytest.raises(PublishError, match="HTTP 404") as caught:
        job_status("job9", api=hub_api(hub))
    assert "hf jobs ps -a" in caught.value.hint


def test_cli_pkg_job_dry_run_prints_the_spec_and_the_sdist(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", NoHubApi)
    options = "--publish acme/tiny-layers --flavor a10g-small --quantize 8bit --group-size 64 --timeout 3h"
    result = CliRunner().invoke(app, ["pkg", "job", SOURCE, *options.split(), "--private", "--dry-run"])

    assert result.exit_code == 0, result.output
    spec = json.loads(result.output)
    build = f'layerline pkg build {SOURCE} -o "$W/package" --quantize 8bit --group-size 64'
    assert script(spec)[-1] == f"{build} --publish {PUBLISH} --private"
    assert (spec["flavor"], spec["timeout"]) == ("a10g-small", "3h")
    assert spec["secrets"] == {"HF_TOKEN": "<HF_TOKEN>"}
    sdist = spec["sdist"]
    assert sdist["path_in_repo"] == f"layerline-job/{sdist['sha256'][:16]}/layerline-0.1.0.tar.gz"


def test_cli_pkg_job_submits_then_status_and_logs_follow_it(hub, logged_in, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *args, **kwargs: hub_api(hub))
    result = CliRunner().invoke(app, ["pkg", "job", SOURCE, "--publish", PUBLISH])

    assert result.exit_code == 0, result.output
    assert f"job job1: {hub.url}/jobs/someone/job1" in result.output
    assert "layerline pkg job logs job1 --follow" in result.output
    assert len(hub.jobs) == 1
    hub.job_stage, hub.job_log = "RUNNING", ["pip install …", "building 30 layers"]
    status = CliRunner().invoke(app, ["pkg", "job", "status", "job1"])
    assert status.exit_code == 0 and "job job1: RUNNING" in status.output
    logs = CliRunner().invoke(app, ["pkg", "job", "logs", "job1"])
    assert logs.exit_code == 0 and logs.output.splitlines() == hub.job_log
