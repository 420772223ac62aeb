"""Publishing a package to the Hub. The Hub is out of reach here, so only HfApi's methods are
stubbed: the fake checks each call against HfApi's real signature and records it."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from typer.testing import CliRunner

from layerline.cli import app
from layerline.errors import PublishError
from layerline.packager.manifest import (
    FORMAT,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    FileEntry,
    Manifest,
    ModelInfo,
    Quantization,
    SourceInfo,
    TokenizerInfo,
    read_manifest,
    write_json_atomic,
)
from layerline.packager.publish import publish_package

REPO = "acme/tiny-layers"


class FakeHubApi:
    """Stands in for huggingface_hub.HfApi: checks each call against the real signature, records it."""

    def __init__(self, *, repo_is_private: bool = True, fail: dict[str, Exception] | None = None) -> None:
        self.token = None
        self.calls: list[tuple[str, tuple, dict]] = []
        self.repo_is_private = repo_is_private
        self.fail = fail or {}

    def _record(self, name: str, *args, **kwargs) -> None:
        inspect.signature(getattr(HfApi, name)).bind(self, *args, **kwargs)
        self.calls.append((name, args, kwargs))
        if name in self.fail:
            raise self.fail[name]

    def create_repo(self, *args, **kwargs) -> str:
        self._record("create_repo", *args, **kwargs)
        return f"https://huggingface.co/{args[0]}"

    def repo_info(self, *args, **kwargs) -> SimpleNamespace:
        self._record("repo_info", *args, **kwargs)
        return SimpleNamespace(private=self.repo_is_private)

    def create_branch(self, *args, **kwargs) -> None:
        self._record("create_branch", *args, **kwargs)

    def upload_folder(self, *args, **kwargs) -> str:
        self._record("upload_folder", *args, **kwargs)
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123"

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def call(self, name: str) -> dict:
        (kwargs,) = [kw for n, _, kw in self.calls if n == name]
        return kwargs


def write_tiny_package(root: Path) -> Path:
    """A two-layer package with made-up bytes and a valid manifest, plus one stray unlisted file."""
    contents = {
        "tokenizer.json": b'{"model": {}}',
        "tokenizer_config.json": b"{}",
        "shared/embed.safetensors": b"embed" * 100,
        "shared/head.safetensors": b"head" * 100,
        "layers/00000.safetensors": b"layer0" * 100,
        "layers/00001.safetensors": b"layer1" * 100,
    }
    for rel, data in contents.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "notes.txt").write_text("not part of the package")
    manifest = Manifest(
        format=FORMAT,
        schema_version=SCHEMA_VERSION,
        model=ModelInfo(
            id="acme/tiny",
            architecture="llama",
            source=SourceInfo(kind="gguf", file_name="tiny.gguf", sha256="0" * 64, bytes=1),
        ),
        config={"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                "vocab_size": 8},
        dtype="float16",
        quantization=Quantization(mode="affine", bits=4, group_size=32),
        tokenizer=TokenizerInfo(
            files=["tokenizer.json", "tokenizer_config.json"],
            chat_template=None,
            bos_token_id=1,
            eos_token_id=2,
            vocab_size=8,
            fingerprint="sha256:" + "0" * 64,
        ),
        files=[FileEntry(rel, hashlib.sha256(data).hexdigest(), len(data)) for rel, data in contents.items()],
        layers={0: "layers/00000.safetensors", 1: "layers/00001.safetensors"},
        shared={"embed": "shared/embed.safetensors", "head": "shared/head.safetensors"},
    )
    write_json_atomic(root / MANIFEST_NAME, manifest.to_json())
    return root


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return write_tiny_package(tmp_path / "tiny")


def http_error(status: int, cls: type[HfHubHTTPError] = HfHubHTTPError) -> HfHubHTTPError:
    """A huggingface_hub HTTP error as raise_for_status makes it, around a stand-in response."""
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return cls(f"{status} Client Error for url: https://huggingface.co/api/...", response=response)


def test_publish_uploads_manifest_and_listed_files_in_one_commit(package, logged_in):
    api = FakeHubApi()
    url = publish_package(package, REPO, api=api, quiet=True)

    assert url == f"https://huggingface.co/{REPO}"
    assert api.names() == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == (REPO,)
    assert api.call("create_repo") == {"repo_type": "model", "private": False, "exist_ok": True}
    upload = api.call("upload_folder")
    assert upload["repo_id"] == REPO
    assert upload["folder_path"] == str(package)
    assert upload["repo_type"] == "model"
    assert upload["revision"] is None
    assert upload["commit_message"] == "layerline: publish acme/tiny layer package"
    assert upload["delete_patterns"] == ["layers/*", "shared/*"]
    # The patterns select the manifest and its files, and nothing else in the folder.
    on_disk = sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file())
    selected = sorted(filter_repo_objects(on_disk, allow_patterns=upload["allow_patterns"]))
    assert "notes.txt" in on_disk
    assert selected == sorted([MANIFEST_NAME, *(p for p in on_disk if p not in (MANIFEST_NAME, "notes.txt"))])


def test_publish_to_a_private_branch_passes_private_and_revision(package, logged_in):
    api = FakeHubApi(repo_is_private=True)
    url = publish_package(package, REPO, private=True, revision="v1", api=api, quiet=True)

    assert url == f"https://huggingface.co/{REPO}/tree/v1"
    assert api.names() == ["create_repo", "repo_info", "create_branch", "upload_folder"]
    assert api.call("create_repo")["private"] is True
    assert api.calls[2][1] == (REPO,)
    assert api.call("create_branch") == {"branch": "v1", "repo_type": "model", "exist_ok": True}
    assert api.call("upload_folder")["revision"] == "v1"


def test_private_publish_refuses_an_existing_public_repo(package, logged_in):
    api = FakeHubApi(repo_is_private=False)
    with pytest.raises(PublishError, match="already exists and is public") as caught:
        publish_package(package, REPO, private=True, api=api, quiet=True)
    assert "hf repos settings" in caught.value.hint
    assert "upload_folder" not in api.names()


@pytest.mark.parametrize(
    "repo_id", ["tiny-layers", "acme/tiny/layers", "/tiny", "acme/", "ac--me/x", "a b/c"]
)
def test_bad_repo_id_is_refused_before_any_hub_call(package, logged_in, repo_id):
    api = FakeHubApi()
    with pytest.raises(PublishError, match="repo id") as caught:
        publish_package(package, repo_id, api=api, quiet=True)
    assert "ORG/NAME" in caught.value.hint
    assert api.calls == []


def test_tampered_package_is_refused_before_any_upload(package, logged_in):
    layer = package / "layers/00001.safetensors"
    layer.write_bytes(b"LAYER1" + layer.read_bytes()[6:])  # same size, other bytes
    (package / "shared/head.safetensors").unlink()
    api = FakeHubApi()
    with pytest.raises(PublishError, match="refusing to publish") as caught:
        publish_package(package, REPO, api=api, quiet=True)
    assert "layers/00001.safetensors (sha256 mismatch)" in caught.value.message
    assert "shared/head.safetensors (missing)" in caught.value.message
    assert "layerline pkg build" in caught.value.hint
    assert api.calls == []


def test_missing_token_says_how_to_log_in(package, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    api = FakeHubApi()
    with pytest.raises(PublishError, match="no Hugging Face token") as caught:
        publish_package(package, REPO, api=api, quiet=True)
    assert "hf auth login" in caught.value.hint and "HF_TOKEN" in caught.value.hint
    assert api.calls == []


def test_token_of_the_given_api_is_enough(package, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    api = FakeHubApi()
    api.token = "hf_from_api"
    publish_package(package, REPO, api=api, quiet=True)
    assert "upload_folder" in api.names()


HUB_FAILURES = {
    "forbidden": ("upload_folder", http_error(403), "HTTP 403", "write access"),
    "bad-token": ("upload_folder", http_error(401), "HTTP 401", "hf auth login"),
    "not-found": ("create_repo", http_error(404, RepositoryNotFoundError), "does not exist", "repo id"),
    "offline": ("create_repo", ConnectionError("Name or service not known"), "could not reach", "network"),
}


@pytest.mark.parametrize(("failing", "error", "expected", "hint"), HUB_FAILURES.values(), ids=HUB_FAILURES)
def test_hub_errors_become_publish_errors_naming_the_fix(package, logged_in, failing, error, expected, hint):
    api = FakeHubApi(fail={failing: error})
    with pytest.raises(PublishError, match=expected) as caught:
        publish_package(package, REPO, api=api, quiet=True)
    assert REPO in caught.value.message
    assert hint in caught.value.hint
    assert caught.value.__cause__ is error


def test_cli_pkg_publish_uploads_and_prints_the_url(package, logged_in, monkeypatch):
    api = FakeHubApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *args, **kwargs: api)
    result = CliRunner().invoke(app, ["pkg", "publish", str(package), REPO, "--revision", "v2"])

    assert result.exit_code == 0, result.output
    assert f"published {REPO}: https://huggingface.co/{REPO}/tree/v2" in result.output
    assert api.names() == ["create_repo", "create_branch", "upload_folder"]
    assert api.call("upload_folder")["revision"] == "v2"


def test_a_built_package_publishes_exactly_the_files_its_manifest_lists(smollm2_package, logged_in):
    api = FakeHubApi()
    publish_package(smollm2_package, REPO, api=api, quiet=True)

    listed = {MANIFEST_NAME, *(entry.path for entry in read_manifest(smollm2_package).files)}
    on_disk = [p.relative_to(smollm2_package).as_posix() for p in smollm2_package.rglob("*") if p.is_file()]
    selected = set(filter_repo_objects(on_disk, allow_patterns=api.call("upload_folder")["allow_patterns"]))
    assert selected == listed
