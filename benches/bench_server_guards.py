"""`vaelink serve` under abuse, on loopback: peak server memory under concurrent maximal bodies,
half-open connections survived while a good client is served, and how long an abandoned large
decode keeps the engine busy after its client disconnects.

    python benches/bench_server_guards.py                      # all three
    python benches/bench_server_guards.py --clients 32 --body-mb 256 --inflight-mb 2048

1. `--clients` threads POST a `--body-mb` body each to `/encode` at once, declared as the largest
   tensor a request may send (16 x 3 x 1024 x 1024 float32, 32 megapixels: admitted by its shape,
   the server reads the body whole, then answers 400 for its length) against
   `--max-body-mb body-mb --max-inflight-mb inflight-mb`; the server's peak RSS (VmHWM) and the
   answers' statuses are reported. With `--image`, the body is sent as an image instead (sized only
   once read: not an image, 400).
2. N connections stall (half their headers, or headers and half a body) while a good client sends
   a small decode; the largest N for which it is answered within 1 s is reported.
3. A 3072 x 3072 decode (the medium seeded model of bench_engine.py, tiled) is abandoned after
   `--abandon-after` seconds; the latency of the next small decode is the time the engine stayed
   busy. The full decode's duration is what the server spent on it before cancellation existed.

Results: benches/results/server-guards-<machine>.json."""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).parent))

from bench_engine import build_vae
from common import free_port, launch_server, write_results

import vaelink


def serve(port: int, *args: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "vaelink", "serve", "--port", str(port), *args]
    return launch_server([*command, "--log-level", "error"], port)


def rss_peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory(clients: int, body_mb: int, inflight_mb: int, as_image: bool) -> dict[str, Any]:
    port = free_port()
    limits = ["--max-body-mb", str(body_mb), "--max-inflight-mb", str(inflight_mb)]
    server = serve(port, *limits)
    try:
        idle = rss(server.pid)
        body = b"\0" * (body_mb << 20)
        barrier = threading.Barrier(clients)

        def one(_: int) -> int | str:
            barrier.wait()
            try:
                url = f"http://127.0.0.1:{port}/encode"
                if not as_image:
                    url += "?shape=16&shape=3&shape=1024&shape=1024&dtype=float32"
                return requests.post(url, data=body, timeout=300).status_code
            except requests.RequestException as e:
                return type(e).__name__

        start = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            statuses = Counter(pool.map(one, range(clients)))
        seconds = time.monotonic() - start
        peak = rss_peak(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    return {
        "clients": clients,
        "body_mib": body_mb,
        "body": "image (unknown size)" if as_image else "tensor [16, 3, 1024, 1024] float32",
        "max_inflight_mib": inflight_mb,
        "idle_rss_mib": round(idle / (1 << 20)),
        "peak_rss_mib": round(peak / (1 << 20)),
        "statuses": {str(k): v for k, v in statuses.items()},
        "seconds": round(seconds, 1),
    }


def half_open(counts: list[int]) -> dict[str, Any]:
    port = free_port()
    server = serve(port)
    z = np.zeros((1, 16, 8, 8), np.float32)  # vaelink-tiny
    query = "shape=1&shape=16&shape=8&shape=8&dtype=float32&output_type=pt&partial_postprocess=True"
    head = f"POST /?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: {z.nbytes}\r\n\r\n".encode()
    results = []
    try:
        for n in counts:
            socks = []
            for i in range(n):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(head[: len(head) // 2] if i % 2 else head + b"\0" * 100)
                socks.append(s)
            start = time.monotonic()
            status = requests.post(
                f"http://127.0.0.1:{port}/?{query}", data=z.tobytes(), timeout=30
            ).status_code
            seconds = time.monotonic() - start
            results.append({"half_open": n, "status": status, "seconds": round(seconds, 3)})
            print(results[-1], flush=True)
            for s in socks:
                s.close()
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(30)
    good = [r["half_open"] for r in results if r["status"] == 200 and r["seconds"] < 1]
    return {"runs": results, "largest_served_within_1s": max(good, default=0)}


def abandoned(size: int, after: float) -> dict[str, Any]:
    from vaelink.cards import get_card
    from vaelink.export import export_vae

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_vae(
            build_vae("medium"), get_card("sdxl"), Path(tmp) / "m", variants=("float32",)
        )
        server = serve(port, "--model", str(folder), "--max-request-megapixels", "64")
        url = f"http://127.0.0.1:{port}/"
        small = np.zeros((1, 4, 8, 8), np.float32)
        big = np.zeros((1, 4, size // 8, size // 8), np.float32)

        def post(z: np.ndarray, timeout: float = 600) -> requests.Response:
            wire = vaelink.to_wire(z)
            params = {"shape": list(wire.shape), "dtype": "float32", "output_type": "pt"}
            return requests.post(url, params=params, data=wire.body, timeout=timeout)

        try:
            start = time.monotonic()
            post(small)
            small_s = time.monotonic() - start
            start = time.monotonic()
            full = post(big)
            full_s = time.monotonic() - start
            assert full.status_code == 200, full.text
            with requests.Session() as session:
                wire = vaelink.to_wire(big)
                params = {"shape": list(wire.shape), "dtype": "float32", "output_type": "pt"}
                # A client that gives up after `after` seconds.
                with contextlib.suppress(requests.Timeout):
                    session.post(url, params=params, data=wire.body, timeout=after)
            start = time.monotonic()
            post(small)
            busy_s = time.monotonic() - start
        finally:
            server.terminate()
            server.wait(30)
    return {
        "model": "medium (bench_engine.py), sdxl card, CPU",
        "image": f"{size}x{size}",
        "full_decode_seconds": round(full_s, 2),
        "abandoned_after_seconds": after,
        "small_decode_seconds_idle": round(small_s, 3),
        "small_decode_seconds_after_abandon": round(busy_s, 3),
        "before_cancellation_engine_busy_after_abandon_seconds": round(full_s - after, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--body-mb", type=int, default=256)
    parser.add_argument("--inflight-mb", type=int, default=4096)
    parser.add_argument("--image", action="store_true", help="send the bodies as images")
    parser.add_argument("--half-open", default="250,500,900,990")
    parser.add_argument("--size", type=int, default=3072)
    parser.add_argument("--abandon-after", type=float, default=3.0)
    parser.add_argument("--only", choices=("memory", "half_open", "abandoned"))
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.only in (None, "memory"):
        results["memory"] = memory(args.clients, args.body_mb, args.inflight_mb, args.image)
        print(results["memory"], flush=True)
    if args.only in (None, "half_open"):
        results["half_open"] = half_open([int(n) for n in args.half_open.split(",")])
    if args.only in (None, "abandoned"):
        results["abandoned"] = abandoned(args.size, args.abandon_after)
        print(results["abandoned"], flush=True)
    print(write_results("server-guards", results))


if __name__ == "__main__":
    main()
