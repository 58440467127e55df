"""Helpers for the server tests: tiny seeded VAEs exported with real cards' constants, a live uvicorn
server on a free loopback port in a background thread, and engine wrappers that slow down."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from vaelink.cards import ModelCard, get_card
from vaelink.engine import Engine
from vaelink.export import export_vae
from vaelink.server.runner import make_server

SEED = 5


def tiny_kl(latent_channels: int) -> AutoencoderKL:
    """Four blocks (spatial factor 8, as the real models), a few channels: milliseconds per call."""
    torch.manual_seed(SEED)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
    ).eval()


@dataclass(frozen=True)
class TinyModel:
    card: ModelCard
    folder: Path

    def engine(self) -> Engine:
        return Engine(self.folder, provider="cpu")


def export_tiny(name: str, root: Path) -> TinyModel:
    """A tiny VAE under the card `name` (sdxl: 4 channels; flux1: 16, shift, packed latents)."""
    card = dataclasses.replace(get_card(name))
    vae = tiny_kl(card.latent_channels)
    folder = export_vae(vae, card, root / name, variants=("float32",))
    return TinyModel(card, folder)


class SlowEngine:
    """An engine whose every call first sleeps `delay` seconds (to fill queues, hold requests)."""

    def __init__(self, engine: Engine, delay: float) -> None:
        self.engine = engine
        self.delay = delay
        self.card = engine.card
        self.provider = engine.provider
        self.dtype = engine.dtype
        self.planned_bytes = engine.planned_bytes
        self.calls = 0

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        time.sleep(self.delay)
        return self.engine.decode(*args, **kwargs)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        time.sleep(self.delay)
        return self.engine.encode(*args, **kwargs)


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 at a free port, in a daemon thread, configured as
    `vaelink serve` configures it."""

    def __init__(self, app: Any, graceful_timeout: float | None = 30.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = make_server(app, log_level="warning", graceful_timeout=graceful_timeout)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as `{'name{labels}': value}` (comments dropped)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def metric_sum(metrics: dict[str, float], prefix: str, **labels: str) -> float:
    """The sum of the samples named `prefix` (exactly, before the labels) carrying `labels`."""
    total = 0.0
    for key, value in metrics.items():
        name, _, rest = key.partition("{")
        if name == prefix and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total
