"""`/health` and `/metrics` for a fleet of replicas of the app: each replica reports its own to a
shared `fleet` (a Ray Serve deployment in `ray_serve`; anything with the same async methods here),
and any replica answers for all of them.

`/metrics` is every replica's Prometheus text, each sample labelled `replica="<id>"`, plus
`vaelink_replicas` (how many reported): sum over `replica` for fleet totals. `/health` says `ok`
while every reporting replica is. Everything else goes to the app untouched."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ..errors import RejectedRequestError
from .app import ServerState, error_response, status_of
from .metrics import CONTENT_TYPE

__all__ = ["Fleet", "FleetRoutes", "merge_metrics"]

log = logging.getLogger("vaelink.server")

Reports = dict[str, tuple[float, dict[str, Any], bytes]]
"""replica id -> (seconds since its report, its health, its metrics text)."""

STALE_AFTER = 5.0
"""A replica whose last report is older than this is gone from `/health` and `/metrics`."""


class Fleet:
    """The replicas' latest reports, keyed by replica id (in `ray_serve`: a deployment of one
    replica that claims no CPU)."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, dict[str, Any], bytes]] = {}
        """replica id -> (`time.monotonic()` of its report, health, metrics text)."""

    def report(self, replica: str, health: dict[str, Any], metrics: bytes) -> None:
        self.reports[replica] = (time.monotonic(), health, metrics)

    def leave(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def collect(self) -> Reports:
        """The reports of the replicas heard from in the last `STALE_AFTER` seconds."""
        now = time.monotonic()
        for replica, (at, _, _) in list(self.reports.items()):
            if now - at > STALE_AFTER:
                del self.reports[replica]
        return {r: (now - at, h, m) for r, (at, h, m) in self.reports.items()}


class _Call(Protocol):
    def remote(self, *args: Any) -> Any: ...


class FleetHandle(Protocol):
    """What a replica calls on the fleet: each `.remote(...)` is awaitable."""

    report: _Call
    leave: _Call
    collect: _Call


class FleetRoutes:
    """The app of one replica, with `/health` and `/metrics` answered for the whole fleet."""

    def __init__(self, app: Any, replica: str, fleet: FleetHandle) -> None:
        self.app = app
        self.replica = replica
        self.fleet = fleet
        self.state: ServerState = app.state.vaelink

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        # Under a route prefix (Serve's `route_prefix`), paths arrive with it as `root_path`;
        # the prefix alone is the app's root, as `/` is without one.
        root = scope.get("root_path", "")
        if root and scope["path"] == root:
            scope = {**scope, "path": root + "/", "raw_path": (root + "/").encode()}
        route = (scope["method"], scope["path"][len(root) :])
        if route == ("GET", "/health"):
            response = await self._health()
        elif route == ("GET", "/metrics"):
            response = await self._metrics(Request(scope))
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    def own_health(self) -> dict[str, Any]:
        state = self.state
        sample = state.metrics.registry.get_sample_value
        return {
            "status": "draining" if state.draining else "ok",
            "models": sorted(state.services),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "in_flight": sample("vaelink_requests_in_flight") or 0,
            "queue_depth": sum(
                sample("vaelink_queue_depth", {"model": name}) or 0 for name in state.services
            ),
        }

    async def report(self) -> None:
        await self.fleet.report.remote(self.replica, self.own_health(), self.state.metrics.render())

    async def report_forever(self, every: float) -> None:
        while True:
            try:
                await self.report()
            except Exception as error:  # the fleet restarting: the next report will do
                log.warning("fleet report failed: %r", error)
            await asyncio.sleep(every)

    async def _reports(self) -> Reports:
        await self.report()  # this replica's own numbers as of now
        reports: Reports = await self.fleet.collect.remote()
        return reports

    async def _health(self) -> Response:
        try:
            reports = await self._reports()
        except Exception as error:
            return error_response(503, f"the fleet cannot be reached: {error!r}", {})
        replicas = {
            replica: {**health, "reported_s_ago": round(age, 3)}
            for replica, (age, health, _) in sorted(reports.items())
        }
        healthy = all(r["status"] == "ok" for r in replicas.values())
        return JSONResponse(
            {
                "status": "ok" if healthy else "degraded",
                "models": sorted(self.state.services),
                "replicas": replicas,
            },
            status_code=200 if healthy else 503,
        )

    async def _metrics(self, request: Request) -> Response:
        try:
            self.state.authorize(request)
        except RejectedRequestError as error:
            return error_response(*status_of(error))
        try:
            reports = await self._reports()
        except Exception as error:
            return error_response(503, f"the fleet cannot be reached: {error!r}", {})
        texts = {replica: text for replica, (_, _, text) in reports.items()}
        return Response(merge_metrics(texts), media_type=CONTENT_TYPE)


def merge_metrics(texts: dict[str, bytes]) -> bytes:
    """The replicas' Prometheus texts as one, each sample labelled with its replica."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            merged.samples += [
                sample._replace(labels={**sample.labels, "replica": replica})
                for sample in family.samples
            ]
    count = GaugeMetricFamily("vaelink_replicas", "Replicas reporting to the fleet", len(texts))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), count]))
    return bytes(generate_latest(registry))


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families
