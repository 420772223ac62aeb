"""Stage 0's optional admin token: it guards the draft API and the dashboard.

API clients send `Authorization: Bearer <token>`. A browser signs in once on the dashboard's
login form and then carries a cookie derived from the token (HttpOnly, SameSite=Strict, so
no other site can make the browser change the draft). Without a token configured, nothing
is checked: stage 0 listens on loopback unless told otherwise.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from .openai_schema import ApiError

COOKIE = "layerline_admin"
_HINT = "send 'Authorization: Bearer <token>' with the token in the file given to --admin-token-file"


class AdminAuth:
    """Checks requests against the admin token; lets everything through when there is none."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    @property
    def required(self) -> bool:
        return self._token is not None

    def accepts(self, token: str) -> bool:
        """Whether `token` is the admin token."""
        return self._token is None or hmac.compare_digest(token.encode(), self._token.encode())

    def cookie_value(self) -> str:
        """The dashboard's session cookie: derived from the token, so the cookie never holds it."""
        assert self._token is not None
        return hmac.new(self._token.encode(), b"layerline dashboard session", hashlib.sha256).hexdigest()

    def allows(self, request: Request) -> bool:
        """Whether `request` carries the admin token (header) or the dashboard's cookie."""
        if self._token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.accepts(given.strip()):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self.cookie_value().encode())

    def require(self, request: Request) -> None:
        """A FastAPI dependency: refuses the request with 401 unless `allows` it."""
        if self.allows(request):
            return
        if "authorization" in request.headers or COOKIE in request.cookies:
            raise ApiError(401, f"the admin token is wrong: {_HINT}", type="authentication_error",
                           code="invalid_admin_token")
        raise ApiError(401, f"this endpoint needs the admin token: {_HINT}", type="authentication_error",
                       code="admin_token_required")
