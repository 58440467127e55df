"""`vaelink serve`: a self-hosted endpoint speaking the Hugging Face remote-VAE protocol, so that
diffusers' `remote_encode` / `remote_decode` (and vaelink's own client) can use local models.

Needs the `serve` extra: `pip install 'vaelink[serve]'` (Starlette, uvicorn, prometheus_client)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..engine import Engine, Provider
from ..errors import VaelinkError
from .batching import Batching
from .guards import Guards
from .protocol import Limits

if TYPE_CHECKING:
    from .runner import LogFormat

__all__ = ["Batching", "Guards", "Limits", "build_app", "create_app", "load_engines", "serve"]


def __getattr__(name: str) -> Any:
    # The app needs the serve extra; importing it lazily keeps `vaelink --help` working without.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_engines(
    models: Sequence[str | os.PathLike[str]], provider: Provider = "auto"
) -> dict[str, Engine]:
    """An engine per `--model` (card name or export folder), keyed by the card's name."""
    engines: dict[str, Engine] = {}
    for model in models:
        engine = Engine(model, provider=provider)
        name = engine.card.name
        if name in engines:
            raise VaelinkError(f"model {name!r} is given twice; each name is served once")
        engines[name] = engine
    return engines


def warm_up(engine: Engine) -> None:
    """One small encode and decode, so that the first request does not pay for loading graphs."""
    import numpy as np

    f, c = engine.card.spatial_factor, engine.card.latent_channels
    engine.decode(np.zeros((1, c, 8, 8), np.float32), output="float")
    engine.encode(np.zeros((1, 3, 8 * f, 8 * f), np.float32))


def build_app(
    models: Sequence[str | os.PathLike[str]],
    *,
    provider: Provider = "auto",
    warmup: bool = True,
    token: str | None = None,
    limits: Limits | None = None,
    batching: Batching | None = None,
    guards: Guards | None = None,
) -> Any:
    """The app (`create_app`) over `models`, loaded and warmed up: what `serve` runs in its
    process and each `vaelink serve --ray` replica in its own."""
    from .app import create_app

    engines = load_engines(models, provider)
    if warmup:
        for engine in engines.values():
            warm_up(engine)
    return create_app(engines, limits=limits, batching=batching, token=token, guards=guards)


def serve(
    models: Sequence[str | os.PathLike[str]],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    provider: Provider = "auto",
    token: str | None = None,
    limits: Limits | None = None,
    batching: Batching | None = None,
    guards: Guards | None = None,
    warmup: bool = True,
    graceful_timeout: float | None = 30.0,
    log_level: str = "info",
    log_format: LogFormat = "text",
) -> None:
    """Binds `host:port` (a port that is taken fails before any model loads), loads the models and
    serves them with uvicorn until SIGINT/SIGTERM; requests in flight are answered before the
    process exits (for at most `graceful_timeout` seconds), bodies still arriving are refused.
    Once listening it logs a line per model and the address; `log_format="json"`: JSON lines."""
    from .runner import bind, make_server

    with bind(host, port) as sock:
        app = build_app(
            models,
            provider=provider,
            warmup=warmup,
            token=token,
            limits=limits,
            batching=batching,
            guards=guards,
        )
        server = make_server(
            app,
            host=host,
            port=port,
            graceful_timeout=graceful_timeout,
            log_level=log_level,
            log_format=log_format,
        )
        server.run(sockets=[sock])
    if not server.started:  # uvicorn logged why (the app's startup failed, say)
        raise VaelinkError(f"the server could not start on {host}:{port}")
