"""Helpers for the client tests (test_api, test_compat, test_cli): tiny seeded models exported once
per session and shared between the modules, and a fake loopback endpoint that answers canned
responses and records what it was sent."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
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


class RawEndpoint:
    """A loopback server for hostile behaviour: each POST is read whole, then `respond(wfile)`
    writes whatever raw HTTP it likes (a trickle, an endless body); GETs get a 404 JSON error.
    `posts` counts the POSTs; `written` adds up the body bytes `respond` reports having sent."""

    def __init__(self, respond: Callable[[Any], int | None]) -> None:
        fake = self
        self.posts = 0
        self.written = 0

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                head = self.rfile.readline()
                length = 0
                while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                self.rfile.read(length)
                if head.startswith(b"GET"):
                    status, headers, body = json_error(404, "not found")
                    lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers.items())]
                    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
                    self.wfile.write("\r\n".join(lines).encode() + body)
                    return
                fake.posts += 1
                with contextlib.suppress(OSError):  # the client went away
                    fake.written += respond(self.wfile) or 0

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __enter__(self) -> RawEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def trickle(shape: list[int], dtype: str, interval: float = 0.2) -> Callable[[Any], int]:
    """A valid tensor answer's head, then its body one byte every `interval` seconds."""

    def respond(wfile: Any) -> int:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        head = (
            f"HTTP/1.1 200 OK\r\nshape: {json.dumps(shape)}\r\ndtype: {dtype}\r\n"
            f"Content-Length: {size}\r\n\r\n"
        )
        wfile.write(head.encode())
        for _ in range(size):
            wfile.write(b"\x00")
            wfile.flush()
            time.sleep(interval)
        return size

    return respond


def endless(total: int = 1 << 30, declared: bool = False) -> Callable[[Any], int]:
    """A 200 "tensor" answer of `total` bytes: its length declared, or undeclared (until the
    connection closes); returns what was written before the client hung up."""

    def respond(wfile: Any) -> int:
        length = f"Content-Length: {total}\r\n" if declared else "Connection: close\r\n"
        wfile.write(f"HTTP/1.1 200 OK\r\nshape: [1]\r\ndtype: uint8\r\n{length}\r\n".encode())
        chunk = bytes(1 << 20)
        sent = 0
        try:
            while sent < total:
                wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass
        return sent

    return respond
