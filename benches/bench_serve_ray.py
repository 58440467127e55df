"""`vaelink serve --ray` against direct `vaelink serve`: requests per second and p50/p99 latency of
small requests with 1, 8 and 32 concurrent clients, for 1 and 2 Serve replicas, behind Serve's
Python proxy and behind HAProxy.

    python benches/bench_serve_ray.py                 # 3 interleaved rounds of 4 s windows
    python benches/bench_serve_ray.py --reps 5 --seconds 6

Each client posts decodes of one 16 x 8 x 8 latent of the bundled model (a 64 x 64 image,
`output_type=pt`, `partial_postprocess=True`: uint8 pixels back) over a keep-alive connection, as
fast as answers come: the per-request overhead is what is measured. Two local Ray clusters run at
once (one per ingress), each serving the app twice - `/one/` with 1 replica, `/two/` with 2 -
and `vaelink serve` runs beside them, so that every server is measured in every round: rounds
visit the servers in rotated order, and each figure is the median over rounds. Clients, servers
and clusters share this machine's cores. Results: benches/results/serve-ray-<machine>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_server import load, percentile
from common import free_port, launch_server, wait_healthy, write_results

CLIENTS = (1, 8, 32)
MAX_QUEUE = 256


def run_cluster(port: int) -> None:
    """(A child process.) A local cluster serving the bundled model at /one/ and /two/; its
    ingress is what the environment says (`start_cluster`)."""
    import ray
    from ray import serve

    from vaelink.cards import DEFAULT_MODEL
    from vaelink.server import Batching
    from vaelink.server.ray_serve import Replicas, application

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    batching = Batching(max_queue=MAX_QUEUE)
    for name, count in (("one", 1), ("two", 2)):
        app = application(
            [DEFAULT_MODEL],
            provider="cpu",
            batching=batching,
            replicas=Replicas(count=count),
            name=name,
        )
        serve.run(app, name=name, route_prefix=f"/{name}")
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    ray.shutdown()


def start_cluster(ingress: str, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    from vaelink.server.ray_serve import haproxy_env

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(folder / ingress), RAY_AUTH_MODE="disabled")
    if ingress == "haproxy":
        (folder / "h").mkdir()
        env.update(haproxy_env(folder / "h"))
    (folder / ingress).mkdir()
    command = [sys.executable, __file__, "--cluster", ingress, "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE)
    assert process.stdout is not None
    if process.stdout.readline().strip() != b"ready":
        raise RuntimeError(f"the {ingress} cluster did not start")
    url = f"http://127.0.0.1:{port}"
    for prefix in ("/one", "/two"):
        if not wait_healthy(f"{url}{prefix}", timeout=180):
            raise RuntimeError(f"{url}{prefix} never became healthy")
    return process, url


def start_direct() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "vaelink", "serve", "--port", str(port)]
    command += ["--provider", "cpu", "--log-level", "warning", "--max-queue", str(MAX_QUEUE)]
    return launch_server(command, port), f"http://127.0.0.1:{port}"


def measure(url: str, clients: int, z: np.ndarray, warmup: float, seconds: float) -> dict[str, Any]:
    latencies, errors = load(url, clients, z.tobytes(), list(z.shape), warmup, seconds)
    return {
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p99_ms": 1e3 * percentile(latencies, 99),
        "errors": errors,
    }


def median_row(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        key: statistics.median(r[key] for r in rounds)
        for key in ("requests_per_s", "p50_ms", "p99_ms")
    } | {"errors": sum(r["errors"] for r in rounds), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--cluster", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cluster:
        return run_cluster(args.port)

    z = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    folder = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # Ray's socket paths are short
    processes: list[subprocess.Popen[bytes]] = []
    try:
        direct, direct_url = start_direct()
        processes.append(direct)
        servers = {"direct": direct_url}
        for ingress in ("proxy", "haproxy"):
            process, url = start_cluster(ingress, folder)
            processes.append(process)
            servers[f"serve-{ingress}-1"] = f"{url}/one"
            servers[f"serve-{ingress}-2"] = f"{url}/two"
        names = list(servers)
        samples: dict[str, dict[int, list[dict[str, Any]]]] = {
            n: {c: [] for c in CLIENTS} for n in names
        }
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for clients in CLIENTS:
                for name in order:
                    row = measure(servers[name], clients, z, args.warmup, args.seconds)
                    samples[name][clients].append(row)
                    print(
                        f"round {rep + 1} {name:16} clients {clients:>2}: "
                        f"{row['requests_per_s']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
                        f"p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}",
                        flush=True,
                    )
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(folder, ignore_errors=True)

    results: dict[str, Any] = {}
    for name in names:
        results[name] = {str(c): median_row(samples[name][c]) for c in CLIENTS}
    ratios = {
        name: {
            str(c): results[name][str(c)]["requests_per_s"]
            / results["direct"][str(c)]["requests_per_s"]
            for c in CLIENTS
        }
        for name in names
        if name != "direct"
    }
    print("\nrequests per second relative to direct vaelink serve (medians):")
    for name, row in ratios.items():
        print(f"  {name:16} " + "  ".join(f"{c:>2} clients {row[str(c)]:.2f}x" for c in CLIENTS))
    path = write_results(
        "serve-ray",
        {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "settings": {"reps": args.reps, "seconds": args.seconds, "warmup": args.warmup},
            "request": "decode 1x16x8x8 float32 (bundled model) -> 64x64 uint8, output_type=pt",
            "servers": results,
            "requests_per_s_vs_direct": ratios,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
