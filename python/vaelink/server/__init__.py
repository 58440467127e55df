"""`vaelink serve`: a self-hosted endpoint speaking the Hugging Face remote-VAE protocol, so that
diffusers' `remote_encode` / `remote_decode` (and vaelink's own client) can use local models.

Needs the `serve` extra: `pip install 'vaelink[serve]'` (Starlette, uvicorn, prometheus_client)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..engine import Engine, Provider
from ..errors import VaelinkError
from ..runtime import CudnnSearch
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
    models: Sequence[str | os.PathLike[str]],
    provider: Provider = "auto",
    cudnn_search: CudnnSearch = "heuristic",
) -> dict[str, Engine]:
    """An engine per `--model` (card name or export folder), keyed by the card's name. A service
    sees many shapes: cuDNN's heuristic by default, not seconds of search on each new one."""
    engines: dict[str, Engine] = {}
    for model in models:
        engine = Engine(model, provider=provider, cudnn_search=cudnn_search)
        name = engine.card.name
        if name in engines:
            raise VaelinkError(f"model {name!r} is given twice; each name is served once")
        engines[name] = engine
    return engines


def build_app(
    models: Sequence[str | os.PathLike[str]],
    *,
    provider: Provider = "auto",
    cudnn_search: CudnnSearch = "heuristic",
    warmup: bool = True,
    token: str | None = None,
    limits: Limits | None = None,
    batching: Batching | None = None,
    guards: Guards | None = None,
) -> Any:
    """The app (`create_app`) over `models`, loaded and warmed up: what `serve` runs in its
    process and each `vaelink serve --ray` replica in its own."""
    from .app import create_app

    engines = load_engines(models, provider, cudnn_search)
    if warmup:
        for engine in engines.values():
            engine.warm_up()
    return create_app(engines, limits=limits, batching=batching, token=token, guards=guards)


def serve(
    models: Sequence[str | os.PathLike[str]],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    provider: Provider = "auto",
    cudnn_search: CudnnSearch = "heuristic",
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
            cudnn_search=cudnn_search,
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
