"""In-process HTTP clients for the shim's ASGI app (no sockets, no server process)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx


async def _release(app: Any) -> None:
    """Close the shim's event-loop connection before the loop that owns it ends (uvicorn
    does this in the app's lifespan shutdown, which these clients do not run)."""
    shim = getattr(app.state, "shim", None)
    if shim is not None:
        await shim.release_loop()


class Api:
    """A synchronous face over httpx.AsyncClient talking to the ASGI app in process, on one
    event loop of its own."""

    def __init__(self, app: Any, *, raise_app_exceptions: bool = True) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://shim")

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def patch(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.run_until_complete(_release(self.app))
        self.loop.close()


def call(app: Any, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request on an event loop of its own."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://shim") as client:
                return await client.request(method, url, **kwargs)
        finally:
            await _release(app)

    return asyncio.run(go())
