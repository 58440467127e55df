"""The ASGI application of `vaelink serve`: Starlette routes over one `ModelService` per model.

Every request's CPU work - body parsing, validation, image codecs - runs in Starlette's thread pool,
and engine calls in the batcher's worker thread, so the event loop only moves bytes."""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import Any, NamedTuple

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..cards import IDENTITY
from ..engine import Engine
from ..errors import (
    ImageTooLargeError,
    QueueFullError,
    RejectedRequestError,
    ShuttingDownError,
    VaelinkError,
)
from . import protocol
from .batching import Batcher, Batching, Job
from .metrics import CONTENT_TYPE, Metrics
from .protocol import Limits

__all__ = ["Batching", "Limits", "ModelService", "create_app"]

log = logging.getLogger("vaelink.server")


class BatchKey(NamedTuple):
    """Requests batch together only when all of this is equal."""

    op: str
    shape: tuple[int, ...]
    """Per-item input shape (everything but the batch dimension)."""
    tile: bool | None
    sample: bool


class ModelService:
    """One served model: its engine behind a batcher. The engine computes unscaled latents; each
    request's own scaling is applied in `protocol`, so requests with any factors batch together."""

    def __init__(
        self, name: str, engine: Engine, limits: Limits, batching: Batching, metrics: Metrics
    ) -> None:
        self.name = name
        self.engine = engine
        self.card = engine.card
        self.limits = limits
        self.batcher: Batcher[BatchKey] = Batcher(
            self._run,
            max_batch=batching.max_batch if batching.enabled else 1,
            max_wait=batching.max_wait_ms / 1000 if batching.enabled else 0.0,
            max_queue=batching.max_queue,
            on_batch=lambda key, images, requests, seconds: metrics.observe_batch(
                name, key.op, images, requests, seconds
            ),
            on_depth=metrics.queue_depth.labels(name).set,
        )

    def _tile(self, height: int, width: int) -> bool | None:
        """Tiled beyond the public endpoints' size; below it the engine decides by memory."""
        return True if height * width > self.limits.tile_above_pixels else None

    def _run(self, key: BatchKey, jobs: list[Job]) -> list[np.ndarray]:
        """One engine call for a batch (in the engine thread), split back into the jobs."""
        x = jobs[0].array if len(jobs) == 1 else np.concatenate([job.array for job in jobs])
        if key.op == "decode":
            out = self.engine.decode(x, output="float", tile=key.tile, scaling=IDENTITY)
        else:
            noise = np.concatenate([job.extra for job in jobs]) if key.sample else None
            out = self.engine.encode(
                x, sample=key.sample, noise=noise, tile=key.tile, scaling=IDENTITY
            )
        bounds = np.cumsum([job.size for job in jobs])[:-1]
        return np.split(np.asarray(out), bounds)

    async def decode(self, body: bytes, query: protocol.Query, accept: str | None) -> Response:
        req = protocol.decode_request(query, accept, self.card)
        latents = await run_in_threadpool(protocol.read_latents, body, req, self.card, self.limits)
        f = self.card.spatial_factor
        tile = self._tile(latents.shape[2] * f, latents.shape[3] * f)
        images = await self.batcher.submit(
            BatchKey("decode", latents.shape[1:], tile, False), latents
        )
        return _response(await run_in_threadpool(protocol.decode_response, images, req))

    def _prepare_encode(
        self, body: bytes, req: protocol.EncodeRequest, sample: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        x = protocol.read_images(body, req, self.card, self.limits)
        if not sample:
            return x, None
        b, _, h, w = x.shape
        f = self.card.spatial_factor
        return x, protocol.noise(req, (b, self.card.latent_channels, h // f, w // f))

    async def encode(self, body: bytes, query: protocol.Query) -> Response:
        req = protocol.encode_request(query, self.card)
        sample = req.sample and self.card.has_posterior  # tiny autoencoders are deterministic
        x, noise = await run_in_threadpool(self._prepare_encode, body, req, sample)
        tile = self._tile(x.shape[2], x.shape[3])
        latents = await self.batcher.submit(BatchKey("encode", x.shape[1:], tile, sample), x, noise)
        return _response(await run_in_threadpool(protocol.encode_response, latents, req))

    def info(self) -> dict[str, Any]:
        card = self.card
        return {
            "architecture": card.architecture,
            "latent_channels": card.latent_channels,
            "scaling_factor": card.scaling_factor,
            "shift_factor": card.shift_factor,
            "spatial_factor": card.spatial_factor,
            "packed_latents": card.packed_latents,
            "provider": self.engine.provider,
            "dtype": self.engine.dtype,
        }


def _response(out: protocol.TensorResponse) -> Response:
    return Response(out.body, media_type=out.media_type, headers=out.headers)


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The protocol's error body: the diffusers client raises `RuntimeError(response.json())`."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _status_of(error: Exception) -> tuple[int, str, dict[str, str]]:
    if isinstance(error, RejectedRequestError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        return error.status, str(error), headers
    if isinstance(error, ClientDisconnect):  # nobody reads this answer; nginx's code for it
        return 499, "client closed the connection", {}
    if isinstance(error, QueueFullError):
        return 503, str(error), {"Retry-After": str(error.retry_after)}
    if isinstance(error, ShuttingDownError):
        return 503, str(error), {"Retry-After": "5"}
    if isinstance(error, ImageTooLargeError):
        return 413, str(error), {}
    if isinstance(error, ValueError):  # vaelink's bad-input errors are ValueErrors too
        return 400, str(error), {}
    if isinstance(error, VaelinkError):  # the engine failed on input that passed validation
        log.error("engine error: %s", error)
        return 500, str(error), {}
    log.exception("unexpected error", exc_info=error)
    return 500, f"internal error ({type(error).__name__})", {}


class ServerState:
    def __init__(
        self,
        services: dict[str, ModelService],
        limits: Limits,
        batching: Batching,
        token: str | None,
        metrics: Metrics,
    ) -> None:
        self.services = services
        self.limits = limits
        self.batching = batching
        self.token = token
        self.metrics = metrics

    def service(self, name: str | None) -> ModelService:
        if name is None:
            if len(self.services) == 1:
                return next(iter(self.services.values()))
            raise RejectedRequestError(
                f"several models are served: POST to /<model>/, one of {sorted(self.services)}",
                404,
            )
        if name not in self.services:
            raise RejectedRequestError(
                f"unknown model {name!r}; served: {sorted(self.services)}", 404
            )
        return self.services[name]

    def authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        given = credentials.strip().encode()
        # compare_digest: the time taken does not tell how much of the token matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.token.encode()):
            raise RejectedRequestError("missing or invalid bearer token", 401)

    def info(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "server": "vaelink",
            "version": __version__,
            "protocol": "huggingface-remote-vae",
            "models": {name: service.info() for name, service in self.services.items()},
            "routes": _route_help(list(self.services)),
            "limits": asdict(self.limits),
            "batching": asdict(self.batching),
            "auth": self.token is not None,
            "capabilities": {
                "decode": {
                    "output_type": ["pil", "pt"],
                    "pil_accept": ["image/jpeg", "image/png", "image/webp", "tensor/binary"],
                    "jpeg_quality": protocol.JPEG_QUALITY,
                    "partial_postprocess": True,
                    "packed_latents": True,
                    "latent_dtypes": list(protocol.FLOAT_DTYPES),
                    "video": False,
                },
                "encode": {
                    "image_formats": ["png", "jpeg", "webp"],
                    "tensor_dtypes": ["float16", "bfloat16", "float32", "uint8"],
                    "posterior": ["mode (default)", "sample (sample=True, seed=N)"],
                    "fit": ["crop (default)", "resize", "none"],
                },
            },
        }


def _route_help(names: list[str]) -> list[str]:
    prefixes = [""] if len(names) == 1 else []
    prefixes += [f"/{name}" for name in names]
    return [f"POST {p}{suffix}" for p in prefixes for suffix in ("/", "/encode", "/decode")]


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise protocol.too_large(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise protocol.too_large(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, cap: int) -> None:
    """Reads and drops the rest of a refused body (up to `cap` bytes), so that a client still
    sending it reads the JSON error instead of a reset connection."""
    total = 0
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            total += len(chunk)
            if total > cap:
                break


Handler = Callable[[Request], Awaitable[Response]]


def _predict(op: str | None) -> Handler:
    """POST handler; `op` fixed by the route (`/encode`, `/decode`) or None to tell from the
    request (`protocol.operation`)."""

    async def handler(request: Request) -> Response:
        state: ServerState = request.app.state.vaelink
        start = time.perf_counter()
        model, kind = "unknown", op or "unknown"
        state.metrics.in_flight.inc()
        try:
            service = state.service(request.path_params.get("model"))
            model = service.name
            state.authorize(request)
            query = protocol.parse_query(request.url.query)
            kind = op or protocol.operation(query, request.headers.get("content-type"))
            body = await read_body(request, state.limits.max_body_bytes)
            if kind == "decode":
                response: Response = await service.decode(
                    body, query, request.headers.get("accept")
                )
            else:
                response = await service.encode(body, query)
        except Exception as error:
            status, message, headers = _status_of(error)
            await _drain(request, 2 * state.limits.max_body_bytes + (16 << 20))
            response = error_response(status, message, headers)
        finally:
            state.metrics.in_flight.dec()
        state.metrics.observe_request(
            model, kind, response.status_code, time.perf_counter() - start
        )
        return response

    return handler


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.vaelink
    return JSONResponse({"status": "ok", "models": sorted(state.services)})


async def info(request: Request) -> Response:
    state: ServerState = request.app.state.vaelink
    state.authorize(request)
    return JSONResponse(state.info())


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.vaelink
    state.authorize(request)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def _routes() -> list[BaseRoute]:
    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    for prefix in ("", "/{model}"):
        for suffix, op in (
            ("", None),
            ("/predict", None),
            ("/decode", "decode"),
            ("/encode", "encode"),
        ):
            handler = _predict(op)
            for path in {prefix + suffix or "/", prefix + suffix + "/"}:
                routes.append(Route(path, handler, methods=["POST"]))
    return routes


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _auth_or_internal_error(request: Request, exc: Exception) -> Response:
    status, message, headers = _status_of(exc)
    return error_response(status, message, headers)


def create_app(
    engines: Mapping[str, Engine],
    *,
    limits: Limits | None = None,
    batching: Batching | None = None,
    token: str | None = None,
) -> Starlette:
    """The server for `engines` (served name -> engine). One model answers at `/` as well as at
    `/<name>/`; several only at `/<name>/`. `token`: require `Authorization: Bearer <token>`."""
    if not engines:
        raise ValueError("serve at least one model")
    limits = limits or Limits()
    batching = batching or Batching()
    gpu = any(engine.provider == "cuda" for engine in engines.values())
    metrics_ = Metrics(gpu=gpu)
    services = {
        name: ModelService(name, engine, limits, batching, metrics_)
        for name, engine in engines.items()
    }
    state = ServerState(services, limits, batching, token or None, metrics_)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for service in services.values():
            await service.batcher.start()
        try:
            yield
        finally:  # uvicorn gets here after the requests in flight have been answered
            for service in services.values():
                await service.batcher.stop()

    app = Starlette(
        routes=_routes(),
        lifespan=lifespan,
        exception_handlers={
            HTTPException: _http_error,
            RejectedRequestError: _auth_or_internal_error,
            Exception: _auth_or_internal_error,
        },
    )
    app.router.redirect_slashes = False  # both spellings are routed; a redirect would drop POSTs
    app.state.vaelink = state
    return app
