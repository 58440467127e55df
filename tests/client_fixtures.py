"""Helpers for the client tests (test_api, test_compat, test_cli): tiny seeded models exported once
per session and shared between the modules, and a fake loopback endpoint that answers canned
responses and records what it was sent."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from server_fixtures import TinyModel, export_tiny

_EXPORTS: dict[str, TinyModel] = {}


def tiny_model(name: str, factory: pytest.TempPathFactory) -> TinyModel:
    """`export_tiny(name)` once per session, whichever module asks first."""
    if name not in _EXPORTS:
        _EXPORTS[name] = export_tiny(name, factory.mktemp(f"client-{name}"))
    return _EXPORTS[name]


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


Canned = tuple[int, dict[str, str], bytes]


def json_error(status: int, message: str, **headers: str) -> Canned:
    body = json.dumps({"error": message}).encode()
    return status, {"Content-Type": "application/json", **headers}, body


def tensor_answer(array: np.ndarray) -> Canned:
    array = np.ascontiguousarray(array)
    shape = "[" + ",".join(map(str, array.shape)) + "]"
    return 200, {"shape": shape, "dtype": str(array.dtype)}, array.tobytes()


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeEndpoint:
    """POSTs get `answers` in order (the last one repeats, or `answer(seen)` computes one); GETs
    get a 404 JSON error, as from a server that is not vaelink's."""

    answers: list[Canned] = field(default_factory=list)
    answer: Callable[[Seen], Canned] | None = None
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _record(self) -> Seen:
                length = int(self.headers.get("content-length") or 0)
                parts = urlsplit(self.path)
                seen = Seen(
                    self.command,
                    parts.path,
                    parse_qs(parts.query, keep_blank_values=True),
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                fake.seen.append(seen)
                return seen

            def _send(self, canned: Canned) -> None:
                status, headers, body = canned
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._record()
                self._send(json_error(404, "not found"))

            def do_POST(self) -> None:
                seen = self._record()
                if fake.answer is not None:
                    self._send(fake.answer(seen))
                else:
                    posts = sum(1 for s in fake.seen if s.method == "POST")
                    self._send(fake.answers[min(posts, len(fake.answers)) - 1])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    @property
    def posts(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST"]

    def __enter__(self) -> FakeEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
