"""Request-size limit (pure ASGI, enforced while the body streams in) and API keys."""

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
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


def require_api_key(request: Request,
                    x_api_key: Annotated[str | None, Header()] = None) -> None:
    keys = request.app.state.settings.api_keys
    if keys and not any(secrets.compare_digest(x_api_key or "", k) for k in keys):
        raise HTTPException(401, "missing or invalid X-API-Key", {"WWW-Authenticate": "X-API-Key"})


ApiKey = Depends(require_api_key)
