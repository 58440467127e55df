"""`vaelink serve --ray`: the same Starlette app as `vaelink serve`, run unchanged inside Ray Serve
replicas, for fleets that outgrow one process. Needs `pip install 'vaelink[ray-serve]'`.

- `application(...)` is the Serve application, for users who compose it into their own Serve
  config; `run(...)` deploys it on a cluster (or a local one it starts) until interrupted.
- Batching stays in the app: each replica admits up to `Batching.max_queue` requests, enough for
  the app to form full batches (Serve's default of 5 would cap every batch at 5), and Serve's
  autoscaler aims at one full batch (`max_batch`) waiting or running per replica.
- `/health` and `/metrics` answer for the whole fleet: every replica reports its own to a small
  `Fleet` deployment each second; whichever replica a request reaches merges those reports. A
  replica that stops reporting (dead, replaced) leaves the merge after `STALE_AFTER` seconds.
- The ingress is Serve's own proxy, or HAProxy (`ingress="haproxy"`, Ray's bundled binary): Serve
  reads that choice from the environment of the cluster's processes, so `run` can set it only for
  a cluster it starts itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..engine import Provider
from ..errors import VaelinkError
from ..runtime import CudnnSearch
from . import build_app
from .batching import Batching
from .fleet import Fleet, FleetRoutes
from .guards import Guards
from .protocol import Limits

try:
    from ray import serve
except ImportError as error:
    raise ImportError(
        f"{error.name} is missing: vaelink serve --ray needs pip install 'vaelink[ray-serve]'",
        name=error.name,
    ) from None

__all__ = ["Fleet", "Replicas", "application", "run"]

Ingress = Literal["proxy", "haproxy"]

REPORT_EVERY = 1.0
"""Seconds between a replica's reports to the fleet."""
APP_NAME = "vaelink"


@dataclass(frozen=True)
class Replicas:
    """How many replicas and what each one claims. `autoscale=(min, max)` lets Serve's autoscaler
    choose between the two, else `count` replicas run."""

    count: int = 1
    autoscale: tuple[int, int] | None = None
    gpus: float = 0.0
    """GPUs per replica: fractions share one GPU between replicas."""
    cpus: float = 1.0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"replicas must be at least 1, got {self.count}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise ValueError(f"autoscale needs 0 <= MIN <= MAX, MAX >= 1; got {low}:{high}")
        if self.gpus < 0 or self.cpus < 0:
            raise ValueError("a replica's GPUs and CPUs cannot be negative")

    def deployment_options(self, batching: Batching) -> dict[str, Any]:
        """Serve's options for the endpoint deployment."""
        per_batch = batching.max_batch if batching.enabled else 1
        options: dict[str, Any] = {
            # Room for the app's whole queue, so that batches fill; beyond it Serve's router
            # holds requests (up to another queue's worth per router, then 503).
            "max_ongoing_requests": max(batching.max_queue, per_batch),
            "max_queued_requests": batching.max_queue,
            "ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus},
        }
        if self.autoscale is None:
            options["num_replicas"] = self.count
        else:
            low, high = self.autoscale
            options["autoscaling_config"] = {
                "min_replicas": low,
                "initial_replicas": max(low, 1),
                "max_replicas": high,
                # Requests waiting or running per replica: one full batch each.
                "target_ongoing_requests": per_batch,
            }
        return options


@dataclass(frozen=True)
class EndpointConfig:
    """What each replica needs to build its app (sent to it by Serve, so plain data)."""

    models: list[str]
    provider: Provider = "auto"
    cudnn_search: CudnnSearch = "heuristic"
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    guards: Guards = field(default_factory=Guards)
    warmup: bool = True


@serve.ingress()
class Endpoint:
    """One replica: the models, the app of `vaelink serve` over them, and its fleet reports."""

    def __init__(self, config: EndpointConfig, fleet: Any) -> None:
        # Serve constructs replicas on their event loop, before any request: blocking is fine.
        app = build_app(
            config.models,
            provider=config.provider,
            cudnn_search=config.cudnn_search,
            warmup=config.warmup,
            token=config.token,
            limits=config.limits,
            batching=config.batching,
            guards=config.guards,
        )
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.routes = FleetRoutes(app, self.replica, fleet)
        self.reporter = asyncio.create_task(self.routes.report_forever(REPORT_EVERY))

    def __serve_build_asgi_app__(self) -> Any:
        return self.routes

    def check_health(self) -> None:
        """Serve replaces a replica whose check raises (or that does not answer it)."""
        if self.reporter.done():
            raise RuntimeError(f"the fleet reporter stopped: {self.reporter.exception()!r}")

    async def __del__(self) -> None:
        self.reporter.cancel()
        with contextlib.suppress(Exception):
            await self.routes.fleet.leave.remote(self.replica)


def application(
    models: Sequence[str | os.PathLike[str]],
    *,
    provider: Provider = "auto",
    cudnn_search: CudnnSearch = "heuristic",
    token: str | None = None,
    limits: Limits | None = None,
    batching: Batching | None = None,
    guards: Guards | None = None,
    replicas: Replicas | None = None,
    warmup: bool = True,
    graceful_timeout: float = 30.0,
    name: str = APP_NAME,
) -> Any:
    """The Serve application (`serve.Application`) serving `models` as `vaelink serve` does: bind
    it in a Serve config, or `serve.run(application(...), route_prefix="/")`. The models must be
    loadable on every replica's node (card names of exported models, or paths those nodes see). A
    replica stopped by Serve answers the requests it holds for at most `graceful_timeout` seconds."""
    if not models:
        raise ValueError("serve at least one model")
    batching = batching or Batching()
    replicas = replicas or Replicas()
    config = EndpointConfig(
        models=[os.fspath(m) for m in models],
        provider=provider,
        cudnn_search=cudnn_search,
        token=token,
        limits=limits or Limits(),
        batching=batching,
        guards=guards or Guards(),
        warmup=warmup,
    )
    fleet = serve.deployment(
        Fleet,
        name=f"{name}-fleet",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": False},  # a report a second from every replica
    ).bind()
    endpoint = serve.deployment(
        Endpoint,
        name=name,
        graceful_shutdown_timeout_s=graceful_timeout,
        **replicas.deployment_options(batching),
    )
    return endpoint.bind(config, fleet)


# -- running it -------------------------------------------------------------------------------------


def run(
    app: Any,
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    ingress: Ingress = "proxy",
    name: str = APP_NAME,
    on_ready: Any = None,
) -> None:
    """Deploys `app` at `http://host:port/` and serves until SIGINT/SIGTERM, then deletes it (and
    stops the cluster when this call started it). `address`: a running cluster ("auto",
    "host:port", "ray://host:10001"); None starts a local cluster, or joins RAY_ADDRESS's."""
    import ray

    started = not ray.is_initialized() and address is None and not os.environ.get("RAY_ADDRESS")
    if ingress == "haproxy" and not started:
        raise VaelinkError(
            "the ingress of a running cluster is chosen where it starts: start it with "
            "RAY_SERVE_ENABLE_HA_PROXY=1 in its environment"
        )
    with _local_cluster_env(ingress) if started else contextlib.nullcontext():
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(app, name=name, route_prefix="/")
            if on_ready is not None:
                on_ready()
            _wait_for_a_signal()
        finally:
            with contextlib.suppress(Exception):
                serve.delete(name)  # the replicas answer the requests they hold first
            if started:
                ray.shutdown()  # the cluster and Serve's actors with it


@contextlib.contextmanager
def _local_cluster_env(ingress: Ingress) -> Iterator[None]:
    """The environment a local cluster starts with: HAProxy on when asked, its files in a
    temporary folder of their own (not the shared /tmp/haproxy-serve)."""
    if ingress != "haproxy":
        yield
        return
    # HAProxy refuses socket paths over 97 bytes, and Ray adds a 56-byte node id folder to them.
    with tempfile.TemporaryDirectory(
        prefix="vh-", dir="/tmp" if os.path.isdir("/tmp") else None
    ) as folder:
        settings = haproxy_env(Path(folder))
        saved = {key: os.environ.get(key) for key in settings}
        os.environ.update(settings)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def haproxy_env(folder: Path) -> dict[str, str]:
    """The variables that make a cluster started with them use HAProxy, its files under `folder`."""
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
    }


def _wait_for_a_signal() -> None:
    done = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("vaelink: stopping the Serve application", file=sys.stderr)
