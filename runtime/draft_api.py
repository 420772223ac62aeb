"""`/v1/draft` on stage 0: read, replace or clear the draft model of a running server.

`PUT` checks the draft (its reference, a local draft's tokenizer, the windows), then loads
it in the background and answers 202; requests keep the settings they started with, and
those that start after the draft is ready speculate with it. `DELETE` turns speculation
off for the next requests. Changes live in this process only.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from layerline.errors import LayerlineError, TokenizerMismatchError

from .admin_auth import AdminAuth
from .openai_schema import ApiError
from .stage0_speculation import Stage0Speculation

log = logging.getLogger("layerline.draft_api")

MAX_WINDOW = 64  # as a request's own `speculative.window`


class DraftBody(BaseModel):
    """The body of `PUT /v1/draft`; window values left out keep their current values."""

    model_config = ConfigDict(extra="forbid")
    draft_model: str = Field(min_length=1)
    window: Literal["fixed", "adaptive"] | None = None
    initial_window: int | None = Field(default=None, ge=1, le=MAX_WINDOW)
    min_window: int | None = Field(default=None, ge=1, le=MAX_WINDOW)
    max_window: int | None = Field(default=None, ge=1, le=MAX_WINDOW)


def draft_router(speculation: Stage0Speculation, admin: AdminAuth) -> APIRouter:
    """GET, PUT and DELETE `/v1/draft`, each behind the admin token when one is set."""
    router = APIRouter(dependencies=[Depends(admin.require)])

    @router.get("/v1/draft")
    async def get_draft() -> dict[str, Any]:
        return speculation.to_json()

    @router.put("/v1/draft")
    async def put_draft(body: DraftBody) -> JSONResponse:
        try:
            # May read a GGUF's tokenizer from disk: off the event loop.
            settings = await run_in_threadpool(
                speculation.with_draft, body.draft_model, window=body.window,
                initial_window=body.initial_window, min_window=body.min_window,
                max_window=body.max_window)
        except TokenizerMismatchError as exc:
            raise ApiError(400, str(exc), param="draft_model", code="tokenizer_mismatch") from exc
        except LayerlineError as exc:
            raise ApiError(400, str(exc), code="invalid_draft") from exc
        speculation.replace(settings)
        state = speculation.to_json()
        log.info("event=draft_put reference=%s window=%s initial=%d min=%d max=%d switched=%s",
                 settings.draft_model, settings.window, settings.initial_window, settings.min_window,
                 settings.max_window, state["pending_draft"] is None)
        return JSONResponse(state, status_code=202 if state["pending_draft"] is not None else 200)

    @router.delete("/v1/draft")
    async def delete_draft() -> dict[str, Any]:
        speculation.clear()
        log.info("event=draft_cleared")
        return speculation.to_json()

    return router
