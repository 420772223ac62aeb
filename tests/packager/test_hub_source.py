"""Building from a Hub repo id. The Hub is out of reach here, so only huggingface_hub's
download calls are stubbed; they hand back local copies and record what they were asked."""

from __future__ import annotations

import huggingface_hub
import pytest

from layerline.errors import SourceError
from layerline.packager.build import BuildOptions, build_package
from layerline.packager.hub_source import SAFETENSORS_PATTERNS, pick_gguf
from layerline.packager.manifest import read_manifest


def test_hub_safetensors_repo_builds_through_snapshot_download(tiny_llama, tmp_path, monkeypatch):
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_llama["folder"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    build_package("acme/tiny-llama", tmp_path / "pkg", BuildOptions(quiet=True))
    assert calls[0][0] == "acme/tiny-llama"
    assert calls[0][1]["allow_patterns"] == SAFETENSORS_PATTERNS
    source = read_manifest(tmp_path / "pkg").model.source
    assert (source.kind, source.file_name) == ("hub", "acme/tiny-llama")


@pytest.mark.slow
def test_hub_gguf_repo_picks_the_file_of_the_asked_quantization(tiny_llama, tmp_path, monkeypatch):
    downloads = []

    class FakeApi:
        def list_repo_files(self, repo_id):
            return ["README.md", "tiny-llama.Q8_0.gguf", "tiny-llama.F32.gguf"]

    def hf_hub_download(repo_id, filename, **kwargs):
        downloads.append((repo_id, filename))
        return str(tiny_llama["gguf"])

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    build_package("acme/tiny-llama-GGUF:f32", tmp_path / "pkg", BuildOptions(quiet=True))
    assert downloads == [("acme/tiny-llama-GGUF", "tiny-llama.F32.gguf")]
    assert read_manifest(tmp_path / "pkg").model.source.kind == "hub"


def test_ambiguous_or_missing_quantization_names_the_files():
    files = ["m.Q4_K_M.gguf", "m.Q4_K_S.gguf", "m.Q8_0.gguf"]
    assert pick_gguf(files, "q8_0") == "m.Q8_0.gguf"
    with pytest.raises(SourceError, match="2 GGUF files match 'Q4_K'"):
        pick_gguf(files, "Q4_K")
    with pytest.raises(SourceError, match="m.Q4_K_M.gguf, m.Q4_K_S.gguf, m.Q8_0.gguf"):
        pick_gguf(files, "Q2_K")


def test_exact_file_name_wins_over_substring_matches():
    assert pick_gguf(["a.gguf", "ba.gguf"], "a.gguf") == "a.gguf"
    assert pick_gguf(["sub/m.Q8_0.gguf", "m.Q4_0.gguf"], "sub/m.Q8_0.gguf") == "sub/m.Q8_0.gguf"
