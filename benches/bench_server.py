"""`vaelink serve` on loopback: throughput and p50/p99 latency with 1, 8 and 32 concurrent clients,
dynamic batching on and off, against the engine called directly in-process.

    python benches/bench_server.py                    # CPU, a medium seeded model, 128 x 128
    python benches/bench_server.py --seconds 20 --size 256

The model is the medium config of bench_engine.py (SD-family shape at quarter width, seeded random
weights: speed does not depend on their values), exported under the SDXL card. Each client sends
decode requests (`output_type=pt`, `partial_postprocess=True`: uint8 pixels back) over a keep-alive
connection, as fast as answers come. The server runs in its own process (`vaelink serve`); clients
and server share this machine's cores. Results: benches/results/server-cpu-<machine>.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import CONFIGS, build_vae
from common import free_port, launch_server, median_seconds, write_results


def start_server(folder: Path, batching: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "vaelink", "serve", "--model", str(folder)]
    command += ["--port", str(port), "--provider", "cpu", "--log-level", "warning"]
    command += ["--max-queue", "256"] + ([] if batching else ["--no-batching"])
    return launch_server(command, port), f"http://127.0.0.1:{port}"


def batch_stats(url: str) -> tuple[float, float]:
    """(engine calls, images) so far, from /metrics."""
    import requests

    calls = images = 0.0
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vaelink_batch_images_count"):
            calls += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vaelink_batch_images_sum"):
            images += float(line.rsplit(" ", 1)[1])
    return calls, images


def load(url: str, clients: int, body: bytes, shape: list[int], warmup: float, seconds: float):
    """`clients` threads posting decodes for `warmup + seconds`; latencies of the requests that
    finished inside the measured window, and how many finished there."""
    import requests

    params = {"shape": shape, "dtype": "float32", "output_type": "pt", "partial_postprocess": True}
    headers = {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}
    start = time.perf_counter()
    t0, t1 = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            while time.perf_counter() < t1:
                sent = time.perf_counter()
                response = session.post(url, params=params, data=body, headers=headers)
                done = time.perf_counter()
                with lock:
                    if response.status_code != 200:
                        errors[0] += 1
                    elif t0 <= done <= t1:
                        latencies.append(done - sent)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def measure_server(
    folder: Path, batching: bool, clients: list[int], z: np.ndarray, warmup: float, seconds: float
) -> dict[str, Any]:
    process, url = start_server(folder, batching)
    rows: dict[str, Any] = {}
    try:
        for n in clients:
            calls0, images0 = batch_stats(url)
            latencies, errors = load(url, n, z.tobytes(), list(z.shape), warmup, seconds)
            calls1, images1 = batch_stats(url)
            row = {
                "requests_per_s": len(latencies) / seconds,
                "p50_ms": 1e3 * percentile(latencies, 50),
                "p99_ms": 1e3 * percentile(latencies, 99),
                "mean_ms": 1e3 * statistics.fmean(latencies) if latencies else float("nan"),
                "requests": len(latencies),
                "errors": errors,
                "images_per_engine_call": (images1 - images0) / max(1.0, calls1 - calls0),
            }
            rows[str(n)] = row
            label = "on " if batching else "off"
            print(
                f"batching {label} clients {n:>2}: {row['requests_per_s']:6.2f} req/s  "
                f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  "
                f"batch {row['images_per_engine_call']:.2f}  errors {errors}",
                flush=True,
            )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    return rows


def engine_direct(folder: Path, z: np.ndarray) -> dict[str, float]:
    """Milliseconds per image of the engine called in-process, batches of 1 and 8."""
    from vaelink.engine import Engine

    engine = Engine(folder, provider="cpu")
    out = {}
    for b in (1, 8):
        batch = np.repeat(z, b, 0)
        seconds = median_seconds(lambda batch=batch: engine.decode(batch), min_runs=3, min_time=1)
        out[str(b)] = 1e3 * seconds / b
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=1.5)
    args = parser.parse_args()
    from vaelink.cards import get_card
    from vaelink.export import export_vae

    clients = [int(n) for n in args.clients.split(",")]
    z = np.random.default_rng(0).standard_normal((1, 4, args.size // 8, args.size // 8))
    z = z.astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_vae(
            build_vae("medium"), get_card("sdxl"), Path(tmp) / "medium", variants=("float32",)
        )
        direct_ms = engine_direct(folder, z)
        print(f"engine in-process, ms per image: {direct_ms}", flush=True)
        results: dict[str, Any] = {
            "device": "cpu",
            "model": {"config": "medium", **CONFIGS["medium"], "seed": 0, "card": "sdxl"},
            "request": {
                "op": "decode",
                "latent_shape": list(z.shape),
                "image": f"{args.size}x{args.size}",
                "output": "pt + partial_postprocess (uint8)",
            },
            "seconds_per_run": args.seconds,
            "cpu_count": os.cpu_count(),
            "engine_direct_ms_per_image": direct_ms,
            "batching_on": measure_server(folder, True, clients, z, args.warmup, args.seconds),
            "batching_off": measure_server(folder, False, clients, z, args.warmup, args.seconds),
        }
    path = write_results("server-cpu", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
