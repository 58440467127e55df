"""The Rust HTTP transport (`vaelink._native.HttpClient`) speaks HTTP/1.1 and HTTP/2: checked against
hypercorn, an ASGI server that speaks both (uvicorn, which `vaelink serve` uses, speaks HTTP/1.1)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config

from vaelink._native import HttpClient


async def _echo_version(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every request with the HTTP version the server saw, and the request body's length."""
    if scope["type"] != "http":
        return
    size = 0
    more = True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"http_version": scope["http_version"], "received": size}).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def h2_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.loglevel = "WARNING"
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(
            serve(_echo_version, config, shutdown_trigger=stop.wait)
        ),
        daemon=True,
    )
    thread.start()
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield url
    loop.call_soon_threadsafe(stop.set)
    thread.join(timeout=10)


@pytest.mark.parametrize(("prior_knowledge", "version"), [(False, "1.1"), (True, "2")])
def test_http1_and_http2(h2_server: str, prior_knowledge: bool, version: str) -> None:
    client = HttpClient(http2_prior_knowledge=prior_knowledge)
    payload = bytes(range(256)) * 4096  # 1 MiB: several HTTP/2 DATA frames
    for _ in range(3):  # the pooled connection is reused
        status, _, body = client.request("POST", h2_server, body=payload)
        assert status == 200
        assert json.loads(bytes(body)) == {"http_version": version, "received": len(payload)}
