"""Resolving and loading a draft model on stage 0, and refusing the wrong one."""

from __future__ import annotations

from layerline.packager.manifest import read_manifest
from layerline.runtime.stage0.speculation.draft_loader import DraftLoader


def target_fingerprint(package) -> str:
    return read_manifest(package).tokenizer.fingerprint


def test_local_package_draft_loads(smollm2_package, smollm2_f32_package, tmp_path):
    loader = DraftLoader(str(smollm2_f32_package), target_fingerprint(smollm2_package), tmp_path, "auto")
    state = loader.start().wait(120)
    assert state.state == "ready", state.reason
    assert loader.model is not None and state.fingerprint == target_fingerprint(smollm2_package)


def test_gguf_draft_is_built_into_the_cache_then_loaded(tiny_llama, smollm2_package, tmp_path):
    loader = DraftLoader(str(tiny_llama["gguf"]), target_fingerprint(smollm2_package), tmp_path, "auto")
    assert loader.start().wait(120).state == "ready"
    assert list((tmp_path / "drafts").iterdir())


def test_draft_with_another_tokenizer_fails_with_the_reason(foreign_tokenizer_draft, smollm2_package,
                                                           tmp_path):
    state = DraftLoader(str(foreign_tokenizer_draft), target_fingerprint(smollm2_package), tmp_path,
                        "auto").start().wait(120)
    assert state.state == "failed"
    assert "tokenizer" in state.reason and target_fingerprint(smollm2_package) in state.reason


def test_missing_draft_fails_with_the_reason(smollm2_package, tmp_path):
    state = DraftLoader("./packages/nope", target_fingerprint(smollm2_package), tmp_path,
                        "auto").start().wait(60)
    assert state.state == "failed" and "does not exist" in state.reason


def test_corrupt_draft_fails_naming_the_file(smollm2_package, tiny_llama, tmp_path):
    import shutil

    from layerline.packager.build import BuildOptions, build_package

    draft = tmp_path / "draft"
    build_package(str(tiny_llama["folder"]), draft, BuildOptions(quiet=True))
    with open(draft / "layers/00001.safetensors", "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\xff\xfe")
    state = DraftLoader(str(draft), target_fingerprint(smollm2_package), tmp_path / "cache",
                        "auto").start().wait(120)
    assert state.state == "failed" and "layers/00001.safetensors" in state.reason
    shutil.rmtree(draft)
