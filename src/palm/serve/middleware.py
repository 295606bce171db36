"""The request guard: a pure ASGI middleware that checks a request before FastAPI sees any of it.

FastAPI reads a whole body before validating it, for as long as the client takes; a client could
otherwise make the server hold any amount of memory, or a connection forever, by sending a large
body or a slow one. Here the API key is checked first (no body is kept for a stranger), then the
body is counted as it arrives and refused past the size limit or past the read deadline.
"""

from __future__ import annotations

import asyncio
import hmac
import json

from .schemas import error_body

OPEN_PATHS = ("/health",)  # what a load balancer probes needs no key


async def reject(
    send,
    status: int,
    message: str,
    code: str,
    kind: str = "invalid_request_error",
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """An OpenAI-shaped error, then the connection closed: what is left of the request is not read."""
    body = json.dumps(error_body(message, kind, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """401 without the API key (when one is set), 413 past `max_body_bytes` (counted as the body arrives:
    a chunked body declares no size), 408 when the body is not in within `read_timeout` seconds."""

    def __init__(self, app, max_body_bytes: int, read_timeout: float, api_key: str | None = None):
        self.app = app
        self.limit = max_body_bytes
        self.read_timeout = read_timeout
        self.key = api_key.encode() if api_key is not None else None

    def _authorized(self, scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
        scheme, _, token = given.partition(b" ")
        # compare_digest takes as long whatever the key's first wrong byte: no guessing it byte by byte.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def _drain(self, receive, budget: int, deadline: float) -> None:
        """Read (and drop) what the client is still sending, so it sees the error rather than a reset."""
        try:
            while budget > 0:
                message = await _before(deadline, receive)
                if message["type"] != "http.request":
                    return
                budget -= len(message.get("body", b""))
                if not message.get("more_body"):
                    return
        except asyncio.TimeoutError:
            return

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.read_timeout
        drain_budget = 8 * self.limit + (1 << 20)
        if self.key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            await self._drain(receive, self.limit, deadline)
            return await reject(
                send,
                401,
                "a valid API key is required: send it as 'Authorization: Bearer KEY'",
                "invalid_api_key",
                headers=((b"www-authenticate", b"Bearer"),),
            )
        too_big = f"request body is larger than the server's limit of {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await reject(send, 400, "the Content-Length header is not a number", "invalid_content_length")
            if declared > self.limit:
                await self._drain(receive, min(declared, drain_budget), deadline)
                return await reject(send, 413, too_big, "request_too_large")
        chunks, size = [], 0
        while True:
            try:
                message = await _before(deadline, receive)
            except asyncio.TimeoutError:
                return await reject(
                    send,
                    408,
                    f"the request body did not arrive within {self.read_timeout:g} seconds",
                    "request_timeout",
                )
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                if message.get("more_body"):
                    await self._drain(receive, drain_budget, deadline)
                return await reject(send, 413, too_big, "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, which the routes watch for

        return await self.app(scope, replay, send)


async def _before(deadline: float, receive):
    """The next ASGI message, or asyncio.TimeoutError once `deadline` (event-loop time) has passed."""
    return await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
