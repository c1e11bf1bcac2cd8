"""Request-size limits (pure ASGI, enforced while the body streams in) and API keys."""

import secrets
from typing import Annotated

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Answers 413 as soon as Content-Length, or the bytes received so far (chunked uploads),
    pass `max_bytes` (`upload_max_bytes` for a model upload, PUT /models/...); the app never
    buffers more than that."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int):
        self.app, self.max_bytes, self.upload_max_bytes = app, max_bytes, upload_max_bytes

    def _limit(self, scope: Scope) -> int:
        upload = scope["method"] == "PUT" and scope["path"].startswith("/models/")
        return self.upload_max_bytes if upload else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await error(400, "invalid Content-Length header")(scope, receive, send)
        if declared is not None and int(declared) > limit:
            return await self._reject(scope, receive, send, limit)
        seen, started = 0, False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(scope, receive, send, limit)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error(413, f"request body larger than {limit} bytes", {"Connection": "close"})
        await response(scope, receive, send)


API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False,
                       description="required when the server has API keys configured")


def require_api_key(request: Request,
                    given: Annotated[str | None, Security(API_KEY)] = None) -> None:
    keys = request.app.state.settings.api_keys
    if keys and not _matches(given, keys):
        raise HTTPException(401, "missing or invalid X-API-Key", {"WWW-Authenticate": "X-API-Key"})


def require_admin_key(request: Request,
                      given: Annotated[str | None, Security(API_KEY)] = None) -> None:
    """Model uploads and deletions: an admin key (SPLITZ_ADMIN_KEYS), never open to all."""
    keys = request.app.state.settings.admin_keys
    if not keys:
        raise HTTPException(403, "model uploads are disabled: this server has no admin key")
    if not given:
        raise HTTPException(401, "missing X-API-Key: an admin key is needed",
                            {"WWW-Authenticate": "X-API-Key"})
    if not _matches(given, keys):
        raise HTTPException(403, "this X-API-Key is not an admin key")


def _matches(given: str | None, keys: list[str]) -> bool:
    """Compared as bytes: a header is latin-1 text whatever bytes it holds, and compare_digest
    refuses non-ASCII str (a TypeError, answered 500, for any key with such a byte)."""
    raw = (given or "").encode("latin-1")
    return any(secrets.compare_digest(raw, k.encode()) for k in keys)


ApiKey = Security(require_api_key)
AdminKey = Security(require_admin_key)
