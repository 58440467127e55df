"""uvicorn as `vaelink serve` runs it: its own connection cap and keep-alive timeout, plus the two
things it lacks - a deadline for a request's headers, and a hook that tells the app when a graceful
shutdown begins (so that bodies still trickling in are refused at once instead of being waited for
until `--graceful-timeout`). Also: the listening socket bound before the models load, a line per
model and the address once listening, and logs as text or JSON lines."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import VaelinkError
from .guards import Guards

if TYPE_CHECKING:
    from .app import ServerState

__all__ = ["JsonFormatter", "LogFormat", "Server", "bind", "log_config", "make_server"]

LogFormat = Literal["text", "json"]

log = logging.getLogger("vaelink.server")


def bind(host: str, port: int) -> socket.socket:
    """The socket to listen on, bound now (as uvicorn would bind it): a port that is taken fails at
    once, before minutes of loading models."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = e.strerror or str(e)
        message = f"cannot listen on {host}:{port}: {reason[:1].lower()}{reason[1:]}"
        raise VaelinkError(message) from None
    return sock


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time (ISO 8601, UTC), level, logger, message, and the
    exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def log_config(log_format: LogFormat = "text", log_level: str = "info") -> dict[str, Any]:
    """uvicorn's logging config, with vaelink's loggers on its handler (stderr); `json` formats
    every record, the access log's too, as a `JsonFormatter` line."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["vaelink"] = {
        "handlers": ["default"],
        "level": log_level.upper(),
        "propagate": False,
    }
    if log_format == "json":
        config["formatters"] = {name: {"()": JsonFormatter} for name in config["formatters"]}
    return config


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
    """uvicorn's server for the app of `state`: logs what it serves once listening, and drains the
    app as soon as a graceful shutdown begins."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._log_ready()

    def _log_ready(self) -> None:
        # uvicorn logs no address for sockets it is handed; the port is the socket's (0: any).
        for name, service in self._state.services.items():
            engine = service.engine
            log.info("model %s: provider %s, dtype %s", name, engine.provider, engine.dtype)
        port = self.servers[0].sockets[0].getsockname()[1]
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        log.info("vaelink serving at http://%s:%d/ (Press CTRL+C to quit)", host, port)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._state.drain()
        await super().shutdown(sockets=sockets)


def make_server(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    graceful_timeout: float | None = 30.0,
    log_level: str = "info",
    log_format: LogFormat = "text",
) -> Server:
    """The uvicorn server for an app made by `create_app`, with the app's `Guards`. h11 always (not
    httptools when installed): the header deadline is built on it."""
    state: ServerState = app.state.vaelink
    guards: Guards = state.guards
    protocol = type("H11Protocol", (_HeaderDeadline,), {"header_timeout": guards.header_timeout})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config(log_format, log_level),
        http=protocol,
        limit_concurrency=guards.max_connections,
        timeout_keep_alive=guards.keep_alive,
        timeout_graceful_shutdown=graceful_timeout,
    )
    return Server(config, state)
