"""Shared benchmark helpers: timing, the machine's description, photos, JSON results."""

from __future__ import annotations

import io
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

# The engine's CPU default is bfloat16 on CPUs with native bfloat16 when OpenVINO is installed; the
# benchmarks compare float32 against float32 peers and recorded figures unless the command line
# says otherwise (`bench_engine.py --precision` asks for each dtype itself).
os.environ.setdefault("VAELINK_CPU_DTYPE", "float32")

# VAELINK_BENCH_RESULTS: another folder (the tests rehearse benchmarks into a temporary one).
RESULTS = Path(os.environ.get("VAELINK_BENCH_RESULTS") or Path(__file__).parent / "results")


def median_seconds(fn: Callable[[], Any], *, min_runs: int = 5, min_time: float = 0.5) -> float:
    """Median wall time of `fn` after one warm-up call, over at least `min_runs` runs and `min_time`."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def psnr(a: np.ndarray, b: np.ndarray, peak: float | None = 255.0) -> float:
    """PSNR of `a` against the reference `b` in dB (inf for identical ones): uint8 images by
    default; `peak=None` for float arrays, over the reference's own range."""
    b = np.asarray(b, np.float64)
    mse = float(np.mean((np.asarray(a, np.float64) - b) ** 2))
    span = float(b.max() - b.min()) if peak is None else peak
    return float("inf") if mse == 0 else float(10 * np.log10(span**2 / mse))


def interleaved_ms(calls: dict[str, Callable[[], Any]], rounds: int = 15) -> dict[str, float]:
    """Median milliseconds of each call, run in rounds (A, B, C, then B, C, A, ...) after one
    warm-up each, so that drift from other load on a shared machine hits every call alike."""
    for fn in calls.values():
        fn()
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def photo(size: int) -> np.ndarray:
    """A real photo (scikit-image's openly licensed retina / astronaut images) at `size x size`:
    the centre square, resampled with Pillow's Lanczos."""
    from PIL import Image
    from skimage import data

    source = data.retina() if size > 512 else data.astronaut()
    h, w = source.shape[:2]
    side = min(h, w)
    square = source[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
    img = Image.fromarray(np.ascontiguousarray(square)).resize((size, size), Image.LANCZOS)
    return np.asarray(img)


def pillow_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_results(name: str, results: dict[str, Any], merge: bool = False) -> Path:
    """`results/<name>-<machine>.json`; `merge`: into what is there (other keys kept)."""
    RESULTS.mkdir(exist_ok=True)
    label = os.environ.get("VAELINK_BENCH_MACHINE", platform.node() or "unknown")
    path = RESULTS / f"{name}-{label}.json"
    old = json.loads(path.read_text()) if merge and path.exists() else {"machine": machine()}
    path.write_text(json.dumps({**old, **results}, indent=2) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120) -> bool:
    """Whether `GET <url>/health` answers 200 within `timeout` seconds (asked every 0.2 s)."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return False


def launch_server(command: list[str], port: int, timeout: float = 120) -> subprocess.Popen[bytes]:
    """Starts a server process and waits until `GET /health` on loopback `port` answers 200."""
    process = subprocess.Popen(command)
    if wait_healthy(f"http://127.0.0.1:{port}", timeout):
        return process
    process.kill()
    raise RuntimeError(f"{command[:4]} did not start")
