"""Request-size limit (pure ASGI, enforced while the body streams in) and API keys."""

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
    pass `max_bytes`; the app never buffers more than that."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(scope, receive, send)
        seen, started = 0, False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
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
                await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error(413, f"request body larger than {self.max_bytes} bytes",
                         {"Connection": "close"})
        await response(scope, receive, send)


API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False,
                       description="required when the server has API keys configured")


def require_api_key(request: Request,
                    given: Annotated[str | None, Security(API_KEY)] = None) -> None:
    """Compared as bytes: a header is latin-1 text whatever bytes it holds, and compare_digest
    refuses non-ASCII str (a TypeError, answered 500, for any key with such a byte)."""
    keys = request.app.state.settings.api_keys
    raw = (given or "").encode("latin-1")
    if keys and not any(secrets.compare_digest(raw, k.encode()) for k in keys):
        raise HTTPException(401, "missing or invalid X-API-Key", {"WWW-Authenticate": "X-API-Key"})


ApiKey = Security(require_api_key)
