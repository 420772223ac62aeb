"""`/v1/draft` on stage 0: read, replace or clear the draft model of a running server.

`PUT` checks the draft (its reference, a local draft's tokenizer, the windows), then loads
it in the background and answers 202; requests keep the settings they started with, and
those that start after the draft is ready speculate with it. `DELETE` turns speculation
off for the next requests. Changes live in this process only.

`PUT` loads only what `DraftPolicy` allows: a local package, GGUF or model folder under
the draft roots, a Hub repo matching the allowed patterns, or `ngram`. Everything else gets
one answer, whether the path exists or not (relative paths, read from stage 0's working
folder, included), and no answer quotes what a file holds.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from layerline.errors import LayerlineError, TokenizerMismatchError
from layerline.packager.source import is_hub_id
from layerline.packager.speculative import NGRAM
from layerline.packager.window_spec import PartialWindowSpec, WindowError

from ..stage0.speculation.plan import SpeculationPlanner
from .admin_auth import AdminAuth
from .openai_schema import ApiError

log = logging.getLogger("layerline.draft_api")

class DraftBody(BaseModel):
    """The body of `PUT /v1/draft`; window settings left out keep their current values.

    The window settings are checked by `WindowSpec`, as in a manifest or the config.
    """

    model_config = ConfigDict(extra="forbid")
    draft_model: str = Field(min_length=1)
    window_policy: str | None = None
    initial_window: int | None = None
    min_window: int | None = None
    max_window: int | None = None

    def window(self) -> PartialWindowSpec:
        """The window settings given."""
        return PartialWindowSpec(self.window_policy, self.initial_window, self.min_window, self.max_window)


class DraftPolicy:
    """Which draft references `PUT /v1/draft` may load."""

    def __init__(self, roots: list[Path], hub_patterns: tuple[str, ...] = ()) -> None:
        self.roots = [root.expanduser().resolve() for root in roots]
        self.hub_patterns = hub_patterns

    def check(self, reference: str) -> None:
        """Raise ApiError (403) unless `reference` is allowed.

        The refusal is the same whichever way a reference fails (a path outside the roots that
        exists, one that does not, a Hub repo not allowed), so it tells nothing of the disk.
        """
        if reference == NGRAM:
            return
        try:
            local = Path(reference).expanduser()
            is_path = local.exists() or not is_hub_id(reference)  # as the loaders will read it
            allowed = is_path and any(local.resolve().is_relative_to(root) for root in self.roots)
        except (OSError, RuntimeError, ValueError):  # `~name` of no such user, a link loop, no access
            is_path, allowed = True, False
        if not is_path:
            repo = reference.partition("@")[0].partition(":")[0]
            allowed = any(fnmatch.fnmatchcase(repo, pattern) for pattern in self.hub_patterns)
        if allowed:
            return
        roots = ", ".join(str(r) for r in self.roots) or "none"
        raise ApiError(403, f"draft {reference} is not allowed here: give a path under the draft roots "
                            f"({roots}), a Hub repo the config's [admin] hub_drafts allows, or ngram; the "
                            "admin may add roots in [admin] draft_roots", type="permission_error",
                       param="draft_model", code="draft_not_allowed")


def draft_router(speculation: SpeculationPlanner, admin: AdminAuth, policy: DraftPolicy) -> APIRouter:
    """GET, PUT and DELETE `/v1/draft`, each behind the admin gate."""
    router = APIRouter(dependencies=[Depends(admin.require)])

    @router.get("/v1/draft")
    async def get_draft() -> dict[str, Any]:
        return speculation.to_json()

    @router.put("/v1/draft")
    async def put_draft(body: DraftBody) -> JSONResponse:
        policy.check(body.draft_model)
        try:
            # May read a GGUF's tokenizer from disk: off the event loop.
            settings = await run_in_threadpool(speculation.served.with_draft, body.draft_model, body.window())
        except TokenizerMismatchError as exc:
            raise ApiError(400, str(exc), param="draft_model", code="tokenizer_mismatch") from exc
        except WindowError as exc:
            raise ApiError(400, str(exc), code="invalid_window") from exc
        except LayerlineError as exc:
            raise ApiError(400, str(exc), code="invalid_draft") from exc
        speculation.served.replace(settings)
        state = speculation.to_json()
        log.info("event=draft_put reference=%s window=%r switched=%s", settings.draft_model,
                 settings.window_spec.describe(), state["pending_draft"] is None)
        return JSONResponse(state, status_code=202 if state["pending_draft"] is not None else 200)

    @router.delete("/v1/draft")
    async def delete_draft() -> dict[str, Any]:
        speculation.served.clear()
        log.info("event=draft_cleared")
        return speculation.to_json()

    return router
