"""The body-size guard: a pure ASGI middleware, so an oversized body is never handed to FastAPI.

FastAPI reads a whole body before validating it; a client could otherwise make the server hold
any amount of memory. Here the body is counted as it arrives and refused past the limit.
"""

from __future__ import annotations

import json

from .schemas import error_body


class BodySizeLimit:
    """Answers 413 to a body over `max_body_bytes`, counted as it arrives (a chunked body declares no size)."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.limit = max_body_bytes

    async def _reject(self, send, status: int, message: str, code: str) -> None:
        body = json.dumps(error_body(message, code=code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def _drain(self, receive, budget: int) -> None:
        """Read (and drop) what the client is still sending, so it sees the 413 rather than a reset."""
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body"):
                return

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body is larger than the server's limit of {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await self._reject(send, 400, "the Content-Length header is not a number", "invalid_content_length")
            if declared > self.limit:
                await self._drain(receive, min(declared, 8 * self.limit + (1 << 20)))
                return await self._reject(send, 413, too_big, "request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                if message.get("more_body"):
                    await self._drain(receive, 8 * self.limit + (1 << 20))
                return await self._reject(send, 413, too_big, "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
