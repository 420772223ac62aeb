"""Running a package build on Hugging Face Jobs. The Hub is out of reach here, so only HfApi's
run_job is stubbed: the fake checks the call against HfApi's real signature and records it."""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from typer.testing import CliRunner

from layerline.cli import app
from layerline.errors import LayerlineError, PublishError
from layerline.hf_jobs.job import BuildJobRequest, submit_build_job

from helpers import HF_TEST_TOKEN

SOURCE = "acme/Tiny-GGUF:tiny.Q4_K_M.gguf"
JOB_URL = "https://huggingface.co/jobs/someone/68a0b1c2"


class FakeJobsApi:
    """Stands in for huggingface_hub.HfApi: checks run_job's arguments against the real signature."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.token = None
        self.calls: list[dict] = []
        self.fail = fail

    def run_job(self, **kwargs) -> SimpleNamespace:
        inspect.signature(HfApi.run_job).bind(self, **kwargs)
        self.calls.append(kwargs)
        if self.fail:
            raise self.fail
        return SimpleNamespace(id="68a0b1c2", url=JOB_URL)


class NoHubApi:
    """An api that must not be used (dry runs)."""

    def __getattr__(self, name: str):
        raise AssertionError(f"dry run called HfApi.{name}")


def request(**changes) -> BuildJobRequest:
    fields = {"source": SOURCE, "publish": "acme/tiny-layers", "flavor": "cpu-upgrade", "quantize": "4bit"}
    fields |= {"group_size": 32, "private": False, "timeout": "2h"}
    return BuildJobRequest(**(fields | changes))


def test_dry_run_spec_shows_command_flavor_and_timeout_and_hides_the_token(logged_in):
    submission = submit_build_job(request(flavor="a10g-small", timeout="90m"), dry_run=True, api=NoHubApi())

    assert (submission.job_id, submission.url) == (None, None)
    spec = submission.spec
    assert spec["image"] == "ghcr.io/astral-sh/uv:python3.12-bookworm"
    assert spec["command"] == [
        "uv", "run", "--no-project", "--python", "3.12", "--with", "layerline",
        "layerline", "pkg", "build", SOURCE, "-o", "/tmp/package",
        "--quantize", "4bit", "--group-size", "32", "--publish", "acme/tiny-layers",
    ]  # fmt: skip
    assert spec["flavor"] == "a10g-small"
    assert spec["timeout"] == "90m"
    assert spec["secrets"] == {"HF_TOKEN": "<HF_TOKEN>"}
    assert HF_TEST_TOKEN not in json.dumps(spec)
    inspect.signature(HfApi.run_job).bind(None, **spec)


def test_dry_run_needs_no_token(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert submit_build_job(request(), dry_run=True, api=NoHubApi()).spec["command"][0] == "uv"


def test_private_and_layerline_spec_reach_the_command():
    wheel = "layerline @ https://example.org/layerline-0.1.0-py3-none-any.whl"
    command = submit_build_job(request(private=True, layerline_spec=wheel), dry_run=True).spec["command"]
    assert command[command.index("--with") + 1] == wheel
    assert command[-1] == "--private"


def test_submit_runs_the_job_with_the_token_as_a_secret_and_returns_id_and_url(logged_in):
    api = FakeJobsApi()
    submission = submit_build_job(request(), api=api)

    assert (submission.job_id, submission.url) == ("68a0b1c2", JOB_URL)
    (sent,) = api.calls
    assert sent["secrets"] == {"HF_TOKEN": HF_TEST_TOKEN}
    assert sent["command"] == submission.spec["command"]
    assert (sent["flavor"], sent["timeout"]) == ("cpu-upgrade", "2h")
    assert HF_TEST_TOKEN not in " ".join(sent["command"])
    assert submission.spec["secrets"] == {"HF_TOKEN": "<HF_TOKEN>"}


def test_submit_without_a_token_says_how_to_log_in(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    api = FakeJobsApi()
    with pytest.raises(PublishError, match="no Hugging Face token") as caught:
        submit_build_job(request(), api=api)
    assert "hf auth login" in caught.value.hint
    assert api.calls == []


def test_jobs_api_error_is_wrapped_with_the_billing_fix(logged_in):
    response = SimpleNamespace(status_code=402, headers={}, request=None)
    error = HfHubHTTPError("402 Payment Required", response=response)
    with pytest.raises(PublishError, match="HTTP 402") as caught:
        submit_build_job(request(), api=FakeJobsApi(fail=error))
    assert "acme/tiny-layers" in caught.value.message
    assert "billing" in caught.value.hint


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"source": "./tiny.gguf"}, "not a Hub reference"),
        ({"publish": "tiny-layers"}, "ORG/NAME"),
        ({"timeout": "2 hours"}, "not a duration"),
        ({"timeout": "5400.5"}, "not a duration"),
        ({"quantize": "3bit"}, "unknown weight format"),
        ({"group_size": 48}, "group size 48"),
    ],
)
def test_requests_a_job_would_reject_are_refused_before_submitting(logged_in, changes, expected):
    api = FakeJobsApi()
    with pytest.raises(LayerlineError, match=expected):
        submit_build_job(request(**changes), api=api)
    assert api.calls == []


def test_a_local_file_is_refused_as_job_source(tmp_path, monkeypatch, logged_in):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")
    with pytest.raises(PublishError, match="is a local path"):
        submit_build_job(request(source="models/tiny.gguf"), api=FakeJobsApi())


def test_cli_pkg_job_dry_run_prints_the_spec(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", NoHubApi)
    options = "--publish acme/tiny-layers --flavor a10g-small --quantize 8bit --group-size 64 --timeout 3h"
    result = CliRunner().invoke(app, ["pkg", "job", SOURCE, *options.split(), "--private", "--dry-run"])

    assert result.exit_code == 0, result.output
    spec = json.loads(result.output)
    build = f"build {SOURCE} -o /tmp/package --quantize 8bit --group-size 64 --publish acme/tiny-layers"
    expected = [*build.split(), "--private"]
    assert spec["command"][-len(expected) :] == expected
    assert (spec["flavor"], spec["timeout"]) == ("a10g-small", "3h")
    assert spec["secrets"] == {"HF_TOKEN": "<HF_TOKEN>"}


def test_cli_pkg_job_submits_and_prints_id_and_url(logged_in, monkeypatch):
    api = FakeJobsApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *args, **kwargs: api)
    result = CliRunner().invoke(app, ["pkg", "job", SOURCE, "--publish", "acme/tiny-layers"])

    assert result.exit_code == 0, result.output
    assert f"job 68a0b1c2: {JOB_URL}" in result.output
    assert len(api.calls) == 1
