"""GET requests straight into an ASGI app, for the in-process benchmarks (``allocations``,
``request_cost``): no HTTP server and no client library between the app and the measure."""

from __future__ import annotations

from typing import Any

#: What a HIT of ours says.
HIT_HEADER = (b"x-fastapi-cache", b"HIT")


class AsgiClient:
    """One caller: sends a GET into ``app`` and keeps the messages of its answer."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.messages: list[dict[str, Any]] = []

    async def _receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def _send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    async def get(self, path: str, query: bytes = b"") -> None:
        self.messages.clear()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": [(b"host", b"bench"), (b"accept", b"*/*")],
            "client": ("127.0.0.1", 50000),
            "server": ("bench", 80),
        }
        await self.app(scope, self._receive, self._send)

    @property
    def body(self) -> bytes:
        """The body of the last answer."""
        return b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )

    def check(self, path: str, *, hit: bool) -> None:
        """The last answer was a 200 (and a HIT of ours when ``hit``)."""
        start = self.messages[0]
        if start["status"] != 200:
            raise RuntimeError(f"{path}: status {start['status']}")
        if hit and HIT_HEADER not in start["headers"]:
            raise RuntimeError(f"{path}: not a HIT: {start['headers']}")
