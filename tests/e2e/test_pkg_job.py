"""`layerline pkg job` end to end: the command its dry run prints runs here as the job's container
would run it, in a fresh virtualenv with nothing but the sdist `pkg job` uploaded. The Hub is
stubbed over HTTP (hub_stub.StubHub, serving SmolLM2's GGUF as a Hub repo); pip reaches PyPI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerline.packager.inspect import inspect_package

from helpers import HF_TEST_TOKEN
from hub_stub import StubHub

SOURCE_REPO = "acme/SmolLM2-135M-Instruct-GGUF"
PUBLISH = "acme/smollm2-135m-layers"


def layerline(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerline", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_the_dry_run_command_installs_the_uploaded_sdist_and_publishes_an_exact_smollm2_that_answers(
        smollm2_gguf: Path, tmp_path: Path):
    with StubHub(HF_TEST_TOKEN) as hub:
        hub.add_file(SOURCE_REPO, smollm2_gguf.name, smollm2_gguf)
        # This machine's settings (pip's index among them), but the Hub is the stub and no token is set.
        here = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        here |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
        job = ["pkg", "job", f"{SOURCE_REPO}:Q4_1", "--publish", PUBLISH]

        dry = layerline(*job, "--dry-run", env=here)
        assert dry.returncode == 0, dry.stderr
        spec = json.loads(dry.stdout)
        submitted = layerline(*job, env=here | {"HF_TOKEN": HF_TEST_TOKEN})
        assert submitted.returncode == 0, submitted.stderr
        assert HF_TEST_TOKEN not in dry.stdout + submitted.stdout
        (sent,) = hub.jobs
        assert sent["command"] == spec["command"] and sent["secrets"] == {"HF_TOKEN": HF_TEST_TOKEN}
        sdist = hub.read(PUBLISH, spec["sdist"]["path_in_repo"])
        assert hashlib.sha256(sdist).hexdigest() == spec["sdist"]["sha256"]

        # The container: the job's env and secret, no PYTHONPATH to this checkout (only the installed
        # sdist runs), and mktemp's folder inside tmp_path.
        container = {k: v for k, v in here.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        container |= spec["env"] | {"HF_TOKEN": HF_TEST_TOKEN, "TMPDIR": str(tmp_path / "job")}
        (tmp_path / "job").mkdir()
        run = subprocess.run(spec["command"], env=container, cwd=tmp_path / "job", capture_output=True,
                             text=True, timeout=1800)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
        assert "OK" in run.stdout  # sha256sum --check
        package = hub.write_repo(PUBLISH, tmp_path / "published")

    (venv,) = (tmp_path / "job").glob("*/venv")
    kernel_dir = next(venv.glob("lib/python*/site-packages/layerline/runtime/model"))
    assert list(kernel_dir.glob("_cpu_kernel*.so")), (kernel_dir / "_cpu_kernel.build-error.txt").read_text()
    summary = inspect_package(package)
    assert summary["quantization"]["gguf_types"]["Q4_1"]["held_as"] == "exact"
    assert summary["fidelity"]["top1_agreement"] == 1.0  # measured in the job, kept in the manifest
    verified = layerline("pkg", "verify", str(package), "-q", env=here)
    assert verified.returncode == 0, verified.stderr
    answer = layerline("run", str(package), "--chat", "What is the capital of France?", "--max-tokens", "30",
                       env=here)
    assert answer.returncode == 0, answer.stderr
    assert "Paris" in answer.stdout
