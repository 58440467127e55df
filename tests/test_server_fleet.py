"""`vaelink.server.fleet` without Ray: replicas of the app reporting to one `Fleet` (called here
through a stand-in for Serve's handles), `/health` and `/metrics` answered for all of them by any
one, stale replicas dropped, and the app reachable under a route prefix."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from server_fixtures import TinyModel, export_tiny, metric_sum, parse_metrics

from vaelink.server import create_app
from vaelink.server import fleet as fleet_module
from vaelink.server.fleet import Fleet, FleetRoutes, merge_metrics


class Handle:
    """What Serve's deployment handle offers: `handle.method.remote(...)`, awaited."""

    def __init__(self, target: Fleet) -> None:
        self.target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.target, name)

        class Call:
            @staticmethod
            async def remote(*args: Any) -> Any:
                return method(*args)

        return Call


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return export_tiny("sdxl", tmp_path_factory.mktemp("fleet"))


def replicas(
    model: TinyModel, fleet: Fleet, count: int, token: str | None = None
) -> list[FleetRoutes]:
    return [
        FleetRoutes(create_app({"sdxl": model.engine()}, token=token), f"r{i}", Handle(fleet))
        for i in range(count)
    ]


def call(
    app: Any,
    method: str,
    path: str,
    *,
    root_path: str = "",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request through the ASGI app: (status, headers, body)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": root_path + path,
        "raw_path": (root_path + path).encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = sent[0]
    response_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], response_headers, b"".join(m.get("body", b"") for m in sent[1:])


def test_every_replica_answers_for_the_whole_fleet(model):
    fleet = Fleet()
    first, second = replicas(model, fleet, 2)
    asyncio.run(second.report())
    call(second.app, "POST", "/", body=b"junk")  # an error counted by the second replica only
    for routes in (first, second):
        status, _, body = call(routes, "GET", "/health")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok" and health["models"] == ["sdxl"]
        assert sorted(health["replicas"]) == ["r0", "r1"]
    status, headers, body = call(first, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    metrics = parse_metrics(body.decode())
    assert metrics["vaelink_replicas"] == 2
    assert metric_sum(metrics, "vaelink_errors_total", replica="r1", status="400") == 1
    assert metric_sum(metrics, "vaelink_errors_total", replica="r0") == 0
    assert 'vaelink_requests_in_flight{replica="r0"}' in metrics


def test_a_replica_that_stops_reporting_leaves(model, monkeypatch):
    fleet = Fleet()
    first, second = replicas(model, fleet, 2)
    clock = [1000.0]
    monkeypatch.setattr(fleet_module.time, "monotonic", lambda: clock[0])
    asyncio.run(second.report())
    clock[0] += fleet_module.STALE_AFTER + 1
    health = json.loads(call(first, "GET", "/health")[2])
    assert sorted(health["replicas"]) == ["r0"]


def test_a_draining_replica_makes_the_fleet_degraded(model):
    fleet = Fleet()
    first, second = replicas(model, fleet, 2)
    second.state.drain()
    asyncio.run(second.report())
    status, _, body = call(first, "GET", "/health")
    assert status == 503 and json.loads(body)["replicas"]["r1"]["status"] == "draining"


def test_metrics_keep_the_token(model):
    (routes,) = replicas(model, Fleet(), 1, token="s3cret")
    status, headers, body = call(routes, "GET", "/metrics")
    assert status == 401 and json.loads(body)["error"] and headers["www-authenticate"] == "Bearer"
    assert call(routes, "GET", "/metrics", headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert call(routes, "GET", "/health")[0] == 200  # open, as in vaelink serve


def test_an_unreachable_fleet_is_a_json_503(model):
    class Down:
        def __getattr__(self, name: str) -> Any:
            class Call:
                @staticmethod
                async def remote(*args: Any) -> Any:
                    raise ConnectionError("gone")

            return Call

    routes = FleetRoutes(create_app({"sdxl": model.engine()}), "r0", Down())
    for path in ("/health", "/metrics"):
        status, _, body = call(routes, "GET", path)
        assert status == 503 and "fleet" in json.loads(body)["error"]


@pytest.mark.parametrize("path", ["", "/", "/decode"])
def test_the_app_answers_under_a_route_prefix(model, path):
    (routes,) = replicas(model, Fleet(), 1)
    status, _, body = call(routes, "POST", path, root_path="/vae", body=b"junk")
    assert status == 400 and json.loads(body)["error"]  # the protocol's answer, not a 404
    status, _, body = call(routes, "GET", "/health", root_path="/vae")
    assert status == 200 and "replicas" in json.loads(body)


def test_merge_labels_every_sample_with_its_replica():
    texts = {
        "a": b'# TYPE x_total counter\nx_total{op="decode"} 3.0\n',
        "b": b'# TYPE x_total counter\nx_total{op="decode"} 4.0\n# TYPE g gauge\ng 1.0\n',
    }
    merged = parse_metrics(merge_metrics(texts).decode())
    assert merged['x_total{op="decode",replica="a"}'] == 3
    assert merged['x_total{op="decode",replica="b"}'] == 4
    assert merged['g{replica="b"}'] == 1 and merged["vaelink_replicas"] == 2
