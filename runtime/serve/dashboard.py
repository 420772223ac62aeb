"""Stage 0's dashboard at `/`: static files from `static/`, behind the admin token.

The page is plain HTML and one script with no outside dependencies (stage 0 may have no
internet); it reads `/v1/status`, `/metrics` and `/v1/draft`, changes the draft through
`/v1/draft`, and chats through `/v1/chat/completions`, like any other client.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response

from .admin_auth import COOKIE, AdminAuth

STATIC = Path(__file__).parent / "static"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
MAX_LOGIN_BODY = 4096


def _login_page(message: str) -> HTMLResponse:
    page = (STATIC / "login.html").read_text(encoding="utf-8").replace("<!--message-->", message)
    return HTMLResponse(page, status_code=401, headers={"cache-control": "no-store"})


def dashboard_router(admin: AdminAuth) -> APIRouter:
    """`/` (the page), `/dashboard/<asset>`, and `/dashboard/login` when a token is set."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        refusal = admin.refusal(request)
        if refusal is not None and refusal.status == 401:
            return _login_page("This dashboard needs the admin token (the file given to "
                               "<code>--admin-token-file</code>).")
        if refusal is not None:
            return PlainTextResponse(refusal.message, status_code=refusal.status)
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    @router.get("/dashboard/{name}", include_in_schema=False)
    async def asset(name: str, request: Request) -> Response:
        if name not in ASSETS:
            return PlainTextResponse(f"no dashboard file {name!r}", status_code=404)
        refusal = admin.refusal(request)
        if refusal is not None:
            message = "sign in on / with the admin token first" if refusal.status == 401 else refusal.message
            return PlainTextResponse(message, status_code=refusal.status)
        return FileResponse(STATIC / name, media_type=ASSETS[name])

    @router.post("/dashboard/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        body = (await request.body())[:MAX_LOGIN_BODY].decode("utf-8", "replace")
        token = parse_qs(body).get("token", [""])[0].strip()
        refusal = admin.refusal(request)
        if refusal is not None and refusal.status != 401:
            return PlainTextResponse(refusal.message, status_code=refusal.status)
        if not admin.required:
            return RedirectResponse("/", status_code=303)
        if not token or not admin.accepts(token):
            return _login_page("That is not the admin token: paste the contents of the file given "
                               "to <code>--admin-token-file</code>.")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, admin.cookie_value(), httponly=True, samesite="strict")
        return response

    return router
