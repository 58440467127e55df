"""`vaelink serve` under load and abuse, on loopback: the in-flight memory budget, refusals before
the body is read (and the connection closed after them), slow and half-open clients, per-request
work limits, cancellation of abandoned work, non-finite output, graceful shutdown with stalled
bodies, and the token options. Each test is bounded to a few seconds."""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from server_fixtures import LiveServer, TinyModel, export_tiny

import vaelink
from vaelink.cards import IDENTITY
from vaelink.cli import _serve_token, build_parser
from vaelink.engine import Engine
from vaelink.errors import NonFiniteOutputError, ServerBusyError
from vaelink.server import Batching, Guards, Limits, create_app
from vaelink.server.batching import Batcher, Job
from vaelink.server.guards import Budget, Hold, PeakHold

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

MIB = 1 << 20
TENSOR = {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}
PT = {"output_type": "pt", "partial_postprocess": True}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return export_tiny("sdxl", tmp_path_factory.mktemp("guard-exports"))


class TileEngine(Engine):
    """A real engine whose every graph run (a tile, a batch slice) sleeps `delay` and is counted."""

    def __init__(self, folder: Path, delay: float, tile_size: int = 64) -> None:
        super().__init__(folder, provider="cpu", tile_size=tile_size)
        self.delay = delay
        self.runs = 0

    def _run_graph(self, part: str, x: Any) -> Any:
        self.runs += 1
        time.sleep(self.delay)
        return super()._run_graph(part, x)

    # Whole-graph tiles, so that every tile passes through `_run_graph` and is counted.
    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return super().encode(*args, tiling="blended", **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return super().decode(*args, tiling="blended", **kwargs)


def latent_query(shape: tuple[int, ...], **extra: Any) -> str:
    params = [("shape", str(n)) for n in shape] + [("dtype", "float32")]
    params += [(k, str(v)) for k, v in {**PT, **extra}.items()]
    return "&".join(f"{k}={v}" for k, v in params)


def post_latents(url: str, z: np.ndarray, **headers: str) -> requests.Response:
    wire = vaelink.to_wire(z)
    params = {"shape": list(wire.shape), "dtype": wire.dtype, **PT}
    return requests.post(
        url, params=params, data=wire.body, headers={**TENSOR, **headers}, timeout=30
    )


def raw(port: int, head: str, body: bytes = b"") -> socket.socket:
    """A raw connection that has sent `head` (request line and headers) and `body`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode() + body)
    return sock


def post_head(query: str, length: int | None, **headers: str) -> str:
    lines = [f"POST /?{query} HTTP/1.1", "Host: x", "Content-Type: tensor/binary"]
    if length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


def read_until_closed(sock: socket.socket, timeout: float = 5) -> bytes:
    """Everything the server sends until it closes the connection (fails when it does not)."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def used(app: Any) -> int:
    return int(app.state.vaelink.budget.used)


def wait_for(condition: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- the in-flight budget ---------------------------------------------------------------------------


def test_budget_peak_hold_and_release() -> None:
    budget = Budget(100)
    hold = Hold(budget)
    hold.take(60, "a")
    with pytest.raises(ServerBusyError):
        Hold(budget).take(50, "b")  # fits the budget, not now
    with pytest.raises(vaelink.RejectedRequestError) as info:
        Hold(budget).take(101, "c")  # never fits
    assert info.value.status == 413
    peaks = PeakHold(budget)
    first = peaks.add(30, "engine")
    second = peaks.add(20, "engine")  # below the peak: takes nothing more
    assert budget.used == 90
    first()
    assert budget.used == 80  # the peak is now 20
    second()
    hold.release()
    hold.release()  # idempotent
    assert budget.used == 0


def test_a_declared_body_that_does_not_fit_is_refused_before_it_is_read(sdxl: TinyModel) -> None:
    """One client holds most of the budget with a half-sent body; another's declared length does
    not fit: 503 with Retry-After at once, no `100 Continue`, connection closed. Once the first is
    gone, the budget is whole again."""
    engine = Engine(sdxl.folder, provider="cpu", memory_limit=64 * MIB)  # kept by the server
    # The engine's planned memory (held once), the small request's arrays, and 4 MiB of bodies.
    budget = engine.planned_bytes(8, 64, 64) + 4 * MIB + 200_000
    guards = Guards(max_inflight_bytes=budget, body_timeout=10)
    app = create_app({"sdxl": engine}, limits=Limits(max_body_bytes=8 * MIB), guards=guards)
    shape = (1, 4, 8, 8)  # a small request, whose declared length is what counts
    with LiveServer(app) as live:
        holder = raw(live.port, post_head(latent_query(shape), 3 * MIB), b"\0" * 1000)
        wait_for(lambda: used(app) >= budget - MIB - 200_000)
        assert used(app) + 3 * MIB > budget
        start = time.monotonic()
        other = raw(live.port, post_head(latent_query(shape), 3 * MIB, Expect="100-continue"))
        answer = read_until_closed(other)
        assert time.monotonic() - start < 1
        assert status_of(answer) == 503 and b"100 Continue" not in answer
        assert b"retry-after: 1" in answer.lower() and b"in-flight" in answer
        holder.close()
        wait_for(lambda: used(app) == 0)
        z = np.zeros((1, 4, 8, 8), np.float32)
        assert post_latents(live.url, z).status_code == 200
        wait_for(lambda: used(app) == 0)


def test_a_chunked_body_is_refused_when_it_passes_the_budget(sdxl: TinyModel) -> None:
    guards = Guards(max_inflight_bytes=2 * MIB)
    app = create_app({"sdxl": sdxl.engine()}, limits=Limits(max_body_bytes=64 * MIB), guards=guards)
    with LiveServer(app) as live:
        chunks = (b"\0" * (256 << 10) for _ in range(32))  # 8 MiB, chunked
        response = requests.post(live.url + "/encode", data=chunks, timeout=30)
        assert response.status_code == 503 and "in-flight" in response.json()["error"]
        wait_for(lambda: used(app) == 0)


# -- refusals before the body is read --------------------------------------------------------------


@pytest.mark.parametrize("expect", [True, False])
def test_a_declared_body_over_the_limit_is_refused_unread_and_the_connection_closed(
    sdxl: TinyModel, expect: bool
) -> None:
    app = create_app({"sdxl": sdxl.engine()}, limits=Limits(max_body_bytes=MIB))
    headers = {"Expect": "100-continue"} if expect else {}
    with LiveServer(app) as live:
        start = time.monotonic()
        sock = raw(live.port, post_head(latent_query((1, 4, 8, 8)), 10 << 30, **headers))
        if not expect:
            sock.sendall(b"\0" * (64 << 10))  # a client that does not wait: its body is not read
        answer = read_until_closed(sock)
        assert time.monotonic() - start < 1
        assert status_of(answer) == 413 and b"100 Continue" not in answer
        assert b"connection: close" in answer.lower()
        # The server goes on; the diffusers-style client (no Expect) gets the JSON error too.
        big = requests.post(
            f"{live.url}/?{latent_query((1, 4, 8, 8))}",
            data=b"\0" * (3 * MIB),
            headers=TENSOR,
            timeout=30,
        )
        assert big.status_code == 413 and "limit" in big.json()["error"]


def test_a_request_failing_auth_is_refused_unread(sdxl: TinyModel) -> None:
    app = create_app({"sdxl": sdxl.engine()}, token="  s3cret\n")  # whitespace is not the token
    with LiveServer(app) as live:
        sock = raw(live.port, post_head(latent_query((1, 4, 8, 8)), 1 << 30, Expect="100-continue"))
        answer = read_until_closed(sock)
        assert status_of(answer) == 401 and b"100 Continue" not in answer
        z = np.zeros((1, 4, 8, 8), np.float32)
        assert post_latents(live.url, z, Authorization="Bearer s3cret").status_code == 200


def test_a_request_over_its_megapixels_is_refused_before_its_body(sdxl: TinyModel) -> None:
    limits = Limits(max_pixels=4096 * 4096, max_request_pixels=2_000_000)
    app = create_app({"sdxl": sdxl.engine()}, limits=limits)
    with LiveServer(app) as live:
        shape = (4, 4, 128, 128)  # 4 images of 1024 x 1024: 4.2 megapixels
        sock = raw(live.port, post_head(latent_query(shape), 4 * 4 * 128 * 128 * 4))
        answer = read_until_closed(sock)
        assert status_of(answer) == 413 and b"megapixels" in answer


def test_work_queued_per_model_is_bounded(sdxl: TinyModel) -> None:
    """While a large request runs, another that would pass the model's queued work is 503; a
    request is still admitted alone, whatever its size."""
    engine = TileEngine(sdxl.folder, delay=0.02)
    limits = Limits(tile_above_pixels=128 * 128, max_pixels=1024 * 1024)
    guards = Guards(max_queued_pixels=300_000)
    app = create_app({"sdxl": engine}, limits=limits, guards=guards)
    with LiveServer(app) as live, ThreadPoolExecutor(1) as pool:
        big = pool.submit(post_latents, live.url, np.zeros((1, 4, 64, 64), np.float32))
        wait_for(lambda: engine.runs > 0)
        busy = post_latents(live.url, np.zeros((1, 4, 32, 32), np.float32))
        assert busy.status_code == 503 and "megapixels of work" in busy.json()["error"]
        assert int(busy.headers["Retry-After"]) >= 1
        assert big.result(timeout=30).status_code == 200


# -- slow clients ------------------------------------------------------------------------------------

HALF_OPEN = 200


def test_half_open_connections_do_not_starve_a_good_client(sdxl: TinyModel) -> None:
    """HALF_OPEN clients stall: half their headers, or headers and half a body. A good client is
    served within a second all along; the stalled ones are cut by the header and body timeouts."""
    guards = Guards(header_timeout=1.5, body_timeout=1.5)
    app = create_app({"sdxl": sdxl.engine()}, guards=guards)
    z = np.zeros((1, 4, 8, 8), np.float32)
    query = latent_query((1, 4, 8, 8))
    with LiveServer(app) as live:
        stalled = []
        for i in range(HALF_OPEN):
            head = post_head(query, 1024)
            if i % 2:
                stalled.append(raw(live.port, head[: len(head) // 2]))
            else:
                stalled.append(raw(live.port, head, b"\0" * 512))
        start = time.monotonic()
        assert post_latents(live.url, z).status_code == 200
        assert time.monotonic() - start < 1
        answers = [read_until_closed(sock, timeout=5) for sock in stalled]
        # Half headers: closed without an answer; half a body: 408.
        assert all(a == b"" for a in answers[1::2])
        assert all(status_of(a) == 408 for a in answers[::2])
        for sock in stalled:
            sock.close()
        assert post_latents(live.url, z).status_code == 200
        wait_for(lambda: used(app) == 0)


def test_graceful_shutdown_does_not_wait_for_stalled_bodies(sdxl: TinyModel) -> None:
    app = create_app({"sdxl": sdxl.engine()}, guards=Guards(body_timeout=60))
    live = LiveServer(app, graceful_timeout=30).start()
    sock = raw(live.port, post_head(latent_query((1, 4, 8, 8)), 1024), b"\0" * 100)
    wait_for(lambda: used(app) > 0)
    start = time.monotonic()
    live.stop()
    assert time.monotonic() - start < 3 and not live.thread.is_alive()
    assert status_of(read_until_closed(sock)) == 503


# -- abandoned work -----------------------------------------------------------------------------------


@contextmanager
def tiled_server(sdxl: TinyModel, **guards: Any) -> Iterator[tuple[LiveServer, TileEngine, Any]]:
    """A server whose 512 x 512 decodes run as 121 tiles of 20 ms (about 2.5 s)."""
    engine = TileEngine(sdxl.folder, delay=0.02)
    limits = Limits(tile_above_pixels=128 * 128)
    app = create_app({"sdxl": engine}, limits=limits, guards=Guards(**guards))
    with LiveServer(app) as live:
        yield live, engine, app


def test_a_disconnected_client_s_tiles_are_dropped(sdxl: TinyModel) -> None:
    z = np.zeros((1, 4, 64, 64), np.float32)
    with tiled_server(sdxl) as (live, engine, app):
        sock = raw(live.port, post_head(latent_query(z.shape), z.nbytes), z.tobytes())
        wait_for(lambda: engine.runs > 0)
        sock.close()
        closed = engine.runs
        small = np.zeros((1, 4, 8, 8), np.float32)
        start = time.monotonic()
        assert post_latents(live.url, small).status_code == 200
        assert time.monotonic() - start < 1
        assert engine.runs - closed <= 3  # the tile running at disconnect (+1), and the small one
        wait_for(lambda: used(app) == 0)


def test_a_request_past_its_deadline_is_504_and_its_tiles_dropped(sdxl: TinyModel) -> None:
    z = np.zeros((1, 4, 64, 64), np.float32)
    with tiled_server(sdxl, request_timeout=0.5) as (live, engine, app):
        start = time.monotonic()
        response = post_latents(live.url, z)
        assert response.status_code == 504 and "timeout" in response.json()["error"]
        assert time.monotonic() - start < 1.5
        runs = engine.runs
        time.sleep(0.2)
        assert engine.runs - runs <= 1
        assert engine.runs < 60  # far from the 121 tiles of the whole decode
        wait_for(lambda: used(app) == 0)


def test_a_shared_batch_is_cancelled_only_when_all_of_its_jobs_are_abandoned() -> None:
    seen: list[threading.Event] = []
    started = threading.Event()

    def run(key: str, jobs: list[Job], cancel: threading.Event) -> list[np.ndarray]:
        seen.append(cancel)
        started.set()
        cancel.wait(0.5)
        return [job.array for job in jobs]

    async def main() -> tuple[bool, bool]:
        batcher: Batcher[str] = Batcher(run, max_batch=2, max_wait=0.05)
        await batcher.start()
        one = asyncio.ensure_future(batcher.submit("k", np.zeros((1, 1))))
        two = asyncio.ensure_future(batcher.submit("k", np.ones((1, 1))))
        await asyncio.to_thread(started.wait, 5)
        one.cancel()
        await asyncio.sleep(0.05)
        after_one = seen[0].is_set()
        two.cancel()
        await asyncio.sleep(0.05)
        after_both = seen[0].is_set()
        await batcher.stop()
        return after_one, after_both

    assert asyncio.run(main()) == (False, True)


# -- non-finite output ------------------------------------------------------------------------------


def test_latents_that_decode_to_nan_are_a_422_and_spoil_no_neighbour(sdxl: TinyModel) -> None:
    engine = sdxl.engine()
    bad = np.full((1, 4, 8, 8), 3e37, np.float32)
    with pytest.raises(NonFiniteOutputError):
        engine.decode(bad, scaling=IDENTITY)
    good = np.zeros((1, 4, 8, 8), np.float32)
    app = create_app({"sdxl": engine}, batching=Batching(max_batch=8, max_wait_ms=200))
    with LiveServer(app) as live, ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda z: post_latents(live.url, z), [bad, good]))
    assert answers[0].status_code == 422 and "NaN" in answers[0].json()["error"]
    assert answers[1].status_code == 200
    np.testing.assert_array_equal(
        vaelink.from_wire(answers[1].content, [1, 64, 64, 3], "uint8"), engine.decode(good)
    )


# -- the token ------------------------------------------------------------------------------------------


def serve_args(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *args])


def test_token_file_env_and_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "token"
    path.write_text("  from-file\n")
    monkeypatch.setenv("VAELINK_TOKEN", " from-env \n")
    assert _serve_token(serve_args("--token-file", str(path))) == "from-file"
    assert "warning" not in capsys.readouterr().err
    assert _serve_token(serve_args()) == "from-env"
    assert _serve_token(serve_args("--token", " from-argv ")) == "from-argv"
    assert "visible to every user" in capsys.readouterr().err
    path.write_text("\n")
    with pytest.raises(SystemExit, match="empty"):
        _serve_token(serve_args("--token-file", str(path)))
    with pytest.raises(SystemExit, match="cannot read"):
        _serve_token(serve_args("--token-file", str(tmp_path / "missing")))
    with pytest.raises(SystemExit):  # one or the other
        serve_args("--token", "a", "--token-file", str(path))
