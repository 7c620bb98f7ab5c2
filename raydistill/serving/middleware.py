"""ASGI middleware that must act before FastAPI parses anything: body size limit and API key.

Both answer with the same JSON error shape as the app's handlers, so clients see one format.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def error_payload(status: int, message: str, type_: str) -> dict:
    return {"error": {"message": message, "type": type_, "code": status}, "detail": message}


async def send_json_error(send: Send, status: int, message: str, type_: str,
                          headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_payload(status, message, type_)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Reject bodies over `max_bytes` with 413, by Content-Length or by counting a chunked body.

    The body is read here (bounded by the limit) and replayed to the app; later `receive` calls go to the
    server, so the app can still notice a client disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await send_json_error(send, 400, "Content-Length is not an integer", "invalid_request")
                return
            if size > self.max_bytes:
                await send_json_error(send, 413, f"request body is {size} bytes; the limit is {self.max_bytes}",
                                      "request_too_large")
                return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS") and declared is None:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await send_json_error(send, 413, f"request body exceeds the limit of {self.max_bytes} bytes",
                                      "request_too_large")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def key_digest(api_key: str) -> str:
    """SHA-256 of the key: replicas get this, never the key itself (it would show in runtime envs)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every route except health and the API docs. On those open routes the
    outcome is left in `request.state.api_key_ok`, so /healthz can answer probes without the key but show its
    details (engine, adapter, counters) only to a caller that has it."""

    OPEN_PATHS = ("/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")

    def __init__(self, app: ASGIApp, api_key_sha256: str):
        if len(api_key_sha256) != 64:
            raise ValueError("api_key_sha256 must be a SHA-256 hex digest")
        self.app = app
        self.expected = api_key_sha256.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        got = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = got.partition(b" ")
        ok = bool(scheme.lower() == b"bearer" and token and hmac.compare_digest(
            hashlib.sha256(token.strip()).hexdigest().encode(), self.expected))
        if (path.rstrip("/") or "/") in self.OPEN_PATHS or scope.get("method") == "OPTIONS":
            # open, but the route may show less to an unauthenticated caller (/healthz: status only)
            scope.setdefault("state", {})["api_key_ok"] = ok
            await self.app(scope, receive, send)
            return
        if not ok:
            reason = "missing Authorization header" if not got else "invalid API key"
            await send_json_error(send, 401, f"{reason}: send `Authorization: Bearer <key>`", "unauthorized",
                                  headers=[(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)
