"""`layerline pkg publish`: upload a verified layer package to the Hugging Face Hub in one commit."""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from layerline.errors import ChecksumError, PublishError
from layerline.progress import byte_progress

from .manifest import MANIFEST_NAME
from .package import LayerPackage

if TYPE_CHECKING:
    from huggingface_hub import HfApi

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Folders a package owns in its repo: files there that the new manifest does not list (layers of
# an older build with more layers) are deleted in the same commit.
OWNED_FOLDERS = ["layers/*", "shared/*"]
LOGIN_HINT = (
    "run `hf auth login`, or set HF_TOKEN to a token with write access "
    "(https://huggingface.co/settings/tokens)"
)
HTTP_HINTS = {
    401: LOGIN_HINT,
    403: "use a token with write access to that namespace (a fine-grained token needs 'write' on it)",
    429: "the Hub is rate-limiting you; wait a few minutes and retry",
}


def check_repo_id(repo_id: str) -> str:
    """Return `repo_id` if it is a Hub repo id of the form ORG/NAME; raise PublishError otherwise."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    problem = None
    if not REPO_ID_RE.match(repo_id):
        problem = "is not of the form ORG/NAME (letters, digits, '-', '_' and '.' on each side of one '/')"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            problem = f"is not a valid Hub repo id: {exc}"
    if problem:
        raise PublishError(
            f"repo id {repo_id!r} {problem}", hint="pass ORG/NAME, e.g. my-org/qwen2.5-coder-1.5b-layers"
        )
    return repo_id


def hub_token(api: HfApi) -> str:
    """The token `api` sends: its own, else huggingface_hub's (HF_TOKEN, then `hf auth login`)."""
    import huggingface_hub

    token = getattr(api, "token", None)
    if isinstance(token, str) and token:
        return token
    token = huggingface_hub.get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token found: HF_TOKEN is not set and `hf auth login` has not been run",
            hint=LOGIN_HINT,
        )
    return token


@contextmanager
def hub_errors(action: str, hints: dict[int, str] | None = None) -> Iterator[None]:
    """Turn huggingface_hub's errors raised while doing `action` into a PublishError naming the fix."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    # huggingface_hub raises its HTTP library's own errors (httpx, requests …) when the Hub cannot
    # be reached; HfHubHTTPError derives from that library's base error, so this finds it.
    network = tuple(b for b in HfHubHTTPError.__bases__ if b is not OSError)
    try:
        yield
    except RepositoryNotFoundError as exc:
        raise PublishError(
            f"{action} failed: the repo does not exist or your token cannot see it ({_first_line(exc)})",
            hint="check the repo id, and that your token has access to it (`hf auth whoami`)",
        ) from exc
    except HfHubHTTPError as exc:
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        hint = {**HTTP_HINTS, **(hints or {})}.get(status, "check https://status.huggingface.co, then retry")
        raise PublishError(f"{action} failed: HTTP {status}: {_first_line(exc)}", hint=hint) from exc
    except HFValidationError as exc:
        raise PublishError(f"{action} failed: {exc}", hint="fix the value named above") from exc
    except (*network, ConnectionError, TimeoutError) as exc:
        raise PublishError(
            f"{action} failed: could not reach the Hugging Face Hub ({exc})",
            hint="check your network (and HF_ENDPOINT / HF_HUB_OFFLINE if set), then retry",
        ) from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def publish_package(
    package: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    api: HfApi | None = None,
    quiet: bool = False,
) -> str:
    """Verify a package, then upload its manifest and listed files to a Hub model repo; return its URL."""
    check_repo_id(repo_id)
    pkg = LayerPackage.open(package)
    if api is None:
        import huggingface_hub

        api = huggingface_hub.HfApi()
    hub_token(api)  # fail before hashing gigabytes, not after
    _verify_before_upload(pkg, quiet=quiet)

    with hub_errors(f"creating the Hub repo {repo_id}"):
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if private:
            refuse_public_repo(api, repo_id)
    if revision:
        with hub_errors(f"creating branch {revision!r} of {repo_id}"):
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)

    files = [MANIFEST_NAME, *pkg.all_files()]
    with hub_errors(f"uploading {pkg.root} to {repo_id}"):
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(pkg.root),
            repo_type="model",
            revision=revision,
            commit_message=f"layerline: publish {pkg.manifest.model.id} layer package",
            # Patterns are fnmatch globs; escaping keeps a '[' in a file name literal.
            allow_patterns=[glob.escape(path) for path in files],
            delete_patterns=OWNED_FOLDERS,
        )
    url = str(repo_url).rstrip("/")
    return f"{url}/tree/{quote(revision, safe='')}" if revision else url


def _verify_before_upload(pkg: LayerPackage, *, quiet: bool) -> None:
    files = pkg.all_files()
    total = sum(pkg.manifest.file(f).bytes for f in files)
    try:
        with byte_progress(f"verifying {pkg.root.name}", total, quiet=quiet) as advance:
            pkg.verify(files, on_bytes=advance)
    except ChecksumError as exc:
        raise PublishError(
            f"refusing to publish {pkg.root}: it failed verification: {', '.join(exc.bad_files)}",
            hint="rebuild the package with `layerline pkg build ... --force`, then publish again",
        ) from exc


def refuse_public_repo(api: HfApi, repo_id: str) -> None:
    """Raise PublishError if `repo_id` is public: a --private upload must not land there."""
    # create_repo(exist_ok=True) leaves an existing repo as it is; a --private upload must not
    # land in a public repo.
    if not api.repo_info(repo_id, repo_type="model").private:
        raise PublishError(
            f"{repo_id} already exists and is public; --private would upload into a public repo",
            hint=f"make it private first (`hf repos settings {repo_id} --private`), or drop --private",
        )
