"""Stage 0's admin gate: it guards the draft API and the dashboard.

With an admin token (`--admin-token-file`), API clients send `Authorization: Bearer
<token>`; a browser signs in once on the dashboard's login form and then carries a cookie
derived from the token (HttpOnly, SameSite=Strict, so no other site can make the browser
change the draft).

Without a token the admin API is open only to this machine: it is off when `--http`
listens beyond loopback, and a request must name a loopback host (or one of
`[admin] allowed_hosts`) in its Host header, so that a web page whose name was made to
resolve to 127.0.0.1 (DNS rebinding) cannot reach it. A state-changing request that comes
from a web page (an `Origin` header) must come from the host it is sent to.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from fastapi import Request

from .openai_schema import ApiError

COOKIE = "layerline_admin"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_HINT = "send 'Authorization: Bearer <token>' with the token in the file given to --admin-token-file"


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port (`[::1]:8000` -> `::1`)."""
    return urlsplit(f"//{host_header}").hostname or ""


class AdminAuth:
    """Decides whether a request may use the admin API."""

    def __init__(self, token: str | None, *, http_loopback: bool = True,
                 allowed_hosts: tuple[str, ...] = ()) -> None:
        self._token = token
        self.enabled = token is not None or http_loopback
        self._allowed_hosts = {h.lower() for h in allowed_hosts}

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

    def refusal(self, request: Request) -> ApiError | None:
        """Why `request` may not use the admin API, or None when it may."""
        if not self.enabled:
            return ApiError(403, "the admin API is off: stage 0 serves HTTP beyond loopback without an "
                                 "admin token", type="permission_error", code="admin_api_off")
        host = host_name(request.headers.get("host", ""))
        if not self._host_allowed(host):
            return ApiError(403, f"this server does not answer admin requests for host {host!r}",
                            type="permission_error", code="host_not_allowed")
        origin = request.headers.get("origin")
        if origin and request.method not in ("GET", "HEAD"):
            if urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
                return ApiError(403, f"a page at {origin} may not change this server",
                                type="permission_error", code="origin_not_allowed")
        if self._token is None or self._has_token(request):
            return None
        if "authorization" in request.headers or COOKIE in request.cookies:
            return ApiError(401, f"the admin token is wrong: {_HINT}", type="authentication_error",
                            code="invalid_admin_token")
        return ApiError(401, f"this endpoint needs the admin token: {_HINT}", type="authentication_error",
                        code="admin_token_required")

    def _host_allowed(self, host: str) -> bool:
        host = host.lower()
        if host in self._allowed_hosts or host in LOOPBACK_HOSTS:
            return True
        # With a token, a forged Host gains nothing (the page has neither token nor cookie).
        return self._token is not None and not self._allowed_hosts

    def _has_token(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.accepts(given.strip()):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self.cookie_value().encode())

    def allows(self, request: Request) -> bool:
        """Whether `request` may use the admin API."""
        return self.refusal(request) is None

    def require(self, request: Request) -> None:
        """A FastAPI dependency: refuses the request (401 or 403) unless it `allows` it."""
        refusal = self.refusal(request)
        if refusal is not None:
            raise refusal
