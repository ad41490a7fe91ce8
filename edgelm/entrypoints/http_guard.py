"""What every HTTP request passes before a route sees it (plain ASGI, so streams are not buffered):
the API key, the body size limit, and back-pressure on the generation routes."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from edgelm.entrypoints.openai.common import error_response

MAX_BODY_BYTES = 8 * 1024 * 1024
OPEN_ROUTES = frozenset({"/health"})
GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/generate"})


class GuardMiddleware:
    """`get_tm()` gives the TokenizerManager (None before start-up), whose `num_inflight` counts the
    generation requests being served; at `max_inflight` new ones get a 503 with Retry-After."""

    def __init__(self, app, api_key: str | None, max_inflight: int | None, get_tm: Callable,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_inflight = max_inflight
        self.get_tm = get_tm
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.lower(): v for k, v in scope["headers"]}
        if self.api_key is not None and path not in OPEN_ROUTES:
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.api_key):
                return await _reply(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                                    scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_body_bytes:
                return await _reply(413, f"request body larger than {self.max_body_bytes} bytes", scope, receive,
                                    send)
        elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            # no declared length: read up to the limit before any route parses it
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    return await _reply(413, f"request body larger than {self.max_body_bytes} bytes", scope,
                                        receive, send)
            receive = _replay(bytes(body), receive)
        tm = self.get_tm() if path in GENERATION_ROUTES and scope["method"] == "POST" else None
        if tm is None:
            return await self.app(scope, receive, send)
        if tm.dead is not None:
            return await _reply(503, f"the server is restarting: {tm.dead}", scope, receive, send)
        if self.max_inflight is not None and tm.num_inflight >= self.max_inflight:
            return await _reply(503, f"the server is busy ({tm.num_inflight} requests in flight); retry later",
                                scope, receive, send, headers={"Retry-After": "1"})
        tm.num_inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            tm.num_inflight -= 1


async def _reply(status: int, message: str, scope, receive, send, headers: dict | None = None) -> None:
    await error_response(status, message, headers=headers)(scope, receive, send)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
