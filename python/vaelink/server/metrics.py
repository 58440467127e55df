"""Prometheus metrics of one server, in a registry of its own (several apps can live in one process,
as in the tests)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..runtime import visible_gpus

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class GpuMemoryCollector(Collector):
    """Used and total memory of each visible NVIDIA GPU (`vaelink.runtime.visible_gpus`: NVML, or
    a torch that already holds a CUDA context); nothing when neither can see a GPU."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        readings = [(gpu.total - gpu.free, gpu.total) for gpu in visible_gpus()]
        if not readings:
            return
        used = GaugeMetricFamily(
            "vaelink_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"]
        )
        total = GaugeMetricFamily("vaelink_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        for index, (used_bytes, total_bytes) in enumerate(readings):
            used.add_metric([str(index)], used_bytes)
            total.add_metric([str(index)], total_bytes)
        yield used
        yield total


class Metrics:
    def __init__(self, *, gpu: bool = False) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vaelink_requests", "Requests answered", ["model", "op", "status"], registry=r
        )
        self.errors = Counter(
            "vaelink_errors",
            "Requests answered with an error",
            ["model", "op", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "vaelink_request_seconds",
            "Time from the request's arrival to its answer",
            ["model", "op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_latency = Histogram(
            "vaelink_engine_seconds",
            "Time of one engine call (a batch)",
            ["model", "op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_images = Histogram(
            "vaelink_batch_images",
            "Images per engine call",
            ["model", "op"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "vaelink_batch_requests",
            "Requests per engine call",
            ["model", "op"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "vaelink_queue_depth", "Requests waiting for the engine", ["model"], registry=r
        )
        self.in_flight = Gauge("vaelink_requests_in_flight", "Requests being handled", registry=r)
        self.inflight_bytes = Gauge(
            "vaelink_inflight_bytes",
            "Bytes of the in-flight budget taken: bodies, arrays, planned engine memory",
            registry=r,
        )
        # The process's memory, CPU and open files, Python's version and GC: the registry is our
        # own, so prometheus_client's defaults are not in it unless registered here.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        if gpu:
            r.register(GpuMemoryCollector())

    def observe_request(self, model: str, op: str, status: int, seconds: float) -> None:
        self.requests.labels(model, op, str(status)).inc()
        if status >= 400:
            self.errors.labels(model, op, str(status)).inc()
        self.latency.labels(model, op).observe(seconds)

    def observe_batch(
        self, model: str, op: str, images: int, requests: int, seconds: float
    ) -> None:
        self.batch_images.labels(model, op).observe(images)
        self.batch_requests.labels(model, op).observe(requests)
        self.engine_latency.labels(model, op).observe(seconds)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
