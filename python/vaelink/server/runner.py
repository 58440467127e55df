"""uvicorn as `vaelink serve` runs it: its own connection cap and keep-alive timeout, plus the two
things it lacks - a deadline for a request's headers, and a hook that tells the app when a graceful
shutdown begins (so that bodies still trickling in are refused at once instead of being waited for
until `--graceful-timeout`)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .guards import Guards

__all__ = ["Server", "make_server"]


class _HeaderDeadline(H11Protocol):
    """h11 with a deadline for each request's headers. uvicorn arms its keep-alive timer only after
    a response, and any byte received disarms it: a client that connects and trickles half its
    headers (slowloris) would hold the connection forever."""

    header_timeout = 10.0
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.header_timeout, self._expire, self.cycle)

    def _expire(self, cycle: Any) -> None:
        # Still the cycle of the arming and no request under way: its headers never came.
        waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
        if waiting and not self.transport.is_closing():
            self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server, calling `on_shutdown` as soon as a graceful shutdown begins."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_shutdown()
        await super().shutdown(sockets=sockets)


def make_server(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    graceful_timeout: float | None = 30.0,
    log_level: str = "info",
) -> Server:
    """The uvicorn server for an app made by `create_app`, with the app's `Guards`. h11 always (not
    httptools when installed): the header deadline is built on it."""
    state = app.state.vaelink
    guards: Guards = state.guards
    protocol = type("H11Protocol", (_HeaderDeadline,), {"header_timeout": guards.header_timeout})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol,
        limit_concurrency=guards.max_connections,
        timeout_keep_alive=guards.keep_alive,
        timeout_graceful_shutdown=graceful_timeout,
    )
    return Server(config, state.drain)
