"""The ASGI application of `vaelink serve`: Starlette routes over one `ModelService` per model.

Every request's CPU work - body parsing, validation, image codecs - runs in Starlette's thread pool,
and engine calls in the batcher's worker thread, so the event loop only moves bytes.

A request is admitted before its body is read: its declared length, its images' size (from the
query for tensors, from the header for images) and the memory and work they imply are checked
against the limits and the in-flight budget (`guards`). A refused request is answered at once,
without reading its body, and its connection closed. A request whose client goes away, or whose
deadline passes, is dropped from the queue - or from the engine, between tiles."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import Any, NamedTuple

import numpy as np
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..cards import IDENTITY
from ..engine import Engine
from ..errors import (
    ImageTooLargeError,
    NonFiniteOutputError,
    OperationCancelledError,
    QueueFullError,
    RejectedRequestError,
    ServerBusyError,
    ShuttingDownError,
    VaelinkError,
)
from . import protocol
from .batching import Batcher, Batching, Job
from .guards import Budget, Guards, Hold, PeakHold, default_inflight_bytes
from .metrics import CONTENT_TYPE, Metrics
from .protocol import Limits

__all__ = ["Batching", "Guards", "Limits", "ModelService", "create_app"]

log = logging.getLogger("vaelink.server")


class BatchKey(NamedTuple):
    """Requests batch together only when all of this is equal."""

    op: str
    shape: tuple[int, ...]
    """Per-item input shape (everything but the batch dimension)."""
    tile: bool | None
    sample: bool
    moments: bool = False


class ModelService:
    """One served model: its engine behind a batcher. The engine computes unscaled latents; each
    request's own scaling is applied in `protocol`, so requests with any factors batch together."""

    def __init__(
        self,
        name: str,
        engine: Engine,
        limits: Limits,
        batching: Batching,
        metrics: Metrics,
        guards: Guards | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.name = name
        self.engine = engine
        self.card = engine.card
        self.limits = limits
        self.guards = guards or Guards()
        self.budget = budget or Budget(default_inflight_bytes())
        self._engine_memory = PeakHold(self.budget)
        if engine.provider == "cpu" and not getattr(engine, "memory_limit", 1):
            # The engine's activations are counted in the budget: it plans within half of it.
            engine.memory_limit = self.budget.capacity // 2
        self.queued_pixels = 0
        """Output pixels of the requests admitted and not yet answered."""
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

    def _call(self, key: BatchKey, jobs: list[Job], cancel: threading.Event) -> list[np.ndarray]:
        x = jobs[0].array if len(jobs) == 1 else np.concatenate([job.array for job in jobs])
        if key.op == "decode":
            out = self.engine.decode(
                x, output="float", tile=key.tile, scaling=IDENTITY, cancel=cancel
            )
        elif key.moments:
            out = self.engine.moments(x, tile=key.tile, cancel=cancel)
        else:
            noise = np.concatenate([job.extra for job in jobs]) if key.sample else None
            out = self.engine.encode(
                x, sample=key.sample, noise=noise, tile=key.tile, scaling=IDENTITY, cancel=cancel
            )
        bounds = np.cumsum([job.size for job in jobs])[:-1]
        return np.split(np.asarray(out), bounds)

    def _run(self, key: BatchKey, jobs: list[Job], cancel: threading.Event) -> list[Any]:
        """One engine call for a batch (in the engine thread), split back into the jobs. When the
        output is not finite, each job runs alone: one request's garbage is not its neighbours'."""
        try:
            return self._call(key, jobs, cancel)
        except NonFiniteOutputError:
            if len(jobs) == 1:
                raise
        results: list[Any] = []
        for job in jobs:
            try:
                results += self._call(key, [job], cancel)
            except NonFiniteOutputError as e:
                results.append(e)
        return results

    def admit(self, size: tuple[int, int, int], hold: Hold) -> None:
        """Counts a request's work and memory before it is queued - for tensors before its body is
        read: (batch, height, width) of its images. Refused when they do not fit now (503) or
        ever (413); what it took is given back by `hold.release()`."""
        batch, height, width = size
        pixels = batch * height * width
        if self.queued_pixels and self.queued_pixels + pixels > self.guards.max_queued_pixels:
            raise ServerBusyError(
                f"server busy: {self.queued_pixels / 1e6:.1f} megapixels of work are queued for "
                f"{self.name}; retry later"
            )
        card, f = self.card, self.card.spatial_factor
        channels = card.latent_channels * (2 if card.has_posterior else 1)
        image_bytes, latent_bytes = pixels * 3 * 4, pixels // f**2 * channels * 4
        # Input and output arrays (float32), and the answer's body beside them.
        hold.take(2 * (image_bytes + latent_bytes), "the request's arrays")
        if self.engine.provider == "cpu":  # on a GPU, activations are not this machine's RAM
            planned = self.engine.planned_bytes(
                max(batch, self.batcher.max_batch), height, width, self._tile(height, width)
            )
            hold.defer(self._engine_memory.add(planned, "the engine's working memory"))
        self.queued_pixels += pixels

        def done() -> None:
            self.queued_pixels -= pixels

        hold.defer(done)

    async def run(
        self, request: Request, key: BatchKey, x: np.ndarray, extra: Any, deadline: float | None
    ) -> np.ndarray:
        """Queues `x` and waits for the engine's answer. A client that goes away, or a deadline
        that passes, cancels the wait: the batcher drops the job, or its running batch when every
        job of it is gone."""
        work = asyncio.ensure_future(self.batcher.submit(key, x, extra))
        gone = asyncio.ensure_future(_disconnected(request))
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait(
                {work, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if work in done:
                result: np.ndarray = work.result()
                return result
            if gone in done:
                raise ClientDisconnect()
            raise RejectedRequestError(
                f"no answer within the server's request timeout ({self.guards.request_timeout} s)",
                504,
            )
        finally:
            work.cancel()
            gone.cancel()

    async def decode(
        self,
        request: Request,
        query: protocol.Query,
        hold: Hold,
        state: ServerState,
        deadline: float | None,
    ) -> Response:
        req = protocol.decode_request(query, request.headers.get("accept"), self.card)
        self.admit(protocol.decode_size(req, self.card, self.limits), hold)
        body = await read_body(request, self.limits.max_body_bytes, hold, state, deadline)
        latents = await run_in_threadpool(protocol.read_latents, body, req, self.card, self.limits)
        f = self.card.spatial_factor
        tile = self._tile(latents.shape[2] * f, latents.shape[3] * f)
        key = BatchKey("decode", latents.shape[1:], tile, False)
        images = await self.run(request, key, latents, None, deadline)
        return _response(await run_in_threadpool(protocol.decode_response, images, req))

    def _prepare_encode(
        self, body: protocol.Body, req: protocol.EncodeRequest, sample: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        x = protocol.read_images(body, req, self.card, self.limits)
        if not sample:
            return x, None
        b, _, h, w = x.shape
        f = self.card.spatial_factor
        return x, protocol.noise(req, (b, self.card.latent_channels, h // f, w // f))

    async def encode(
        self,
        request: Request,
        query: protocol.Query,
        hold: Hold,
        state: ServerState,
        deadline: float | None,
    ) -> Response:
        req = protocol.encode_request(query, self.card)
        size = protocol.encode_size(None, req, self.card, self.limits)  # tensors: from the query
        if size is not None:
            self.admit(size, hold)
        body = await read_body(request, self.limits.max_body_bytes, hold, state, deadline)
        if size is None:  # an image: its size from its header, before it is decoded
            size = protocol.encode_size(body, req, self.card, self.limits)
            if size is not None:
                self.admit(size, hold)
        # Tiny autoencoders are deterministic; moments are the posterior itself, not a sample.
        sample = req.sample and self.card.has_posterior and not req.moments
        x, noise = await run_in_threadpool(self._prepare_encode, body, req, sample)
        tile = self._tile(x.shape[2], x.shape[3])
        key = BatchKey("encode", x.shape[1:], tile, sample, req.moments)
        latents = await self.run(request, key, x, noise, deadline)
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
            # What runs, after the engine checked its sessions (not what was asked for).
            "provider": self.engine.provider,
            "execution_providers": list(getattr(self.engine, "execution_providers", [])),
            "device_id": getattr(self.engine, "device_id", 0)
            if self.engine.provider == "cuda"
            else None,
            "dtype": self.engine.dtype,
        }


def _response(out: protocol.TensorResponse) -> Response:
    return Response(out.body, media_type=out.media_type, headers=out.headers)


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The protocol's error body: the diffusers client raises `RuntimeError(response.json())`."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def status_of(error: Exception) -> tuple[int, str, dict[str, str]]:
    """The status, message and headers that answer a request that failed with `error`."""
    if isinstance(error, RejectedRequestError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        return error.status, str(error), headers
    if isinstance(error, ClientDisconnect):  # nobody reads this answer; nginx's code for it
        return 499, "client closed the connection", {}
    if isinstance(error, QueueFullError | ServerBusyError):
        return 503, str(error), {"Retry-After": str(error.retry_after)}
    if isinstance(error, OperationCancelledError):
        return 499, "client closed the connection", {}
    if isinstance(error, NonFiniteOutputError):  # valid input, garbage out: not a server failure
        return 422, str(error), {}
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
        guards: Guards,
        budget: Budget,
    ) -> None:
        self.services = services
        self.limits = limits
        self.batching = batching
        self.token = token
        self.metrics = metrics
        self.guards = guards
        self.budget = budget
        self.draining = False
        self.reading: set[asyncio.Timeout] = set()
        """The timeouts of the body reads under way, expired at once by `drain`."""

    def drain(self) -> None:
        """A graceful shutdown begins: bodies still arriving are refused (503) rather than waited
        for; requests already read are answered."""
        self.draining = True
        for timeout in self.reading:
            timeout.reschedule(0)

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
            "guards": {**asdict(self.guards), "max_inflight_bytes": self.budget.capacity},
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
                    "posterior": [
                        "mode (default)",
                        "sample (sample=True, seed=N)",
                        "moments (moments=True: mean and log-variance, unscaled)",
                    ],
                    "fit": ["crop (default)", "resize", "none"],
                },
            },
        }


def _route_help(names: list[str]) -> list[str]:
    prefixes = [""] if len(names) == 1 else []
    prefixes += [f"/{name}" for name in names]
    return [f"POST {p}{suffix}" for p in prefixes for suffix in ("/", "/encode", "/decode")]


async def read_body(
    request: Request,
    limit: int,
    hold: Hold | None = None,
    state: ServerState | None = None,
    deadline: float | None = None,
) -> bytearray:
    """The raw body, refused with 413 when its declared length exceeds `limit` bytes (before a
    byte of it is read - uvicorn sends `100 Continue` only on the first read) or as soon as what
    arrives does. Its bytes are taken from `hold` as they are declared or arrive. Read into one
    buffer (of the declared length when there is one): no second copy of it. With `state`:
    408 when no chunk comes for `guards.body_timeout` seconds or `deadline` passes, 503 when the
    server begins to shut down."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise protocol.too_large(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    taken = 0
    if hold is not None and declared.isdigit():
        hold.take(int(declared), "the request's body")
        taken = int(declared)
    body = bytearray(int(declared)) if declared.isdigit() else bytearray()
    size = 0
    stream = request.stream()
    while True:
        try:
            chunk = await _next_chunk(stream, state, deadline)
        except StopAsyncIteration:
            break
        end = size + len(chunk)
        if end > limit:
            raise protocol.too_large(f"body exceeds the limit of {limit} bytes")
        if hold is not None and end > taken:  # chunked: taken as it arrives
            hold.take(end - taken, "the request's body")
            taken = end
        body[size:end] = chunk  # grows a chunked body; h11 refuses more than was declared
        size = end
    request.state.body_read = True
    del body[size:]  # a body shorter than declared is refused as malformed later
    return body


async def _next_chunk(
    stream: AsyncIterator[bytes], state: ServerState | None, deadline: float | None
) -> bytes:
    if state is None:
        return await anext(stream)
    if state.draining:
        raise ShuttingDownError("server shutting down")
    timeout = state.guards.body_timeout
    if deadline is not None:
        timeout = min(timeout, deadline - time.monotonic())
    try:
        async with asyncio.timeout(max(0.0, timeout)) as cm:
            state.reading.add(cm)
            try:
                return await anext(stream)
            finally:
                state.reading.discard(cm)
    except TimeoutError:
        if state.draining:
            raise ShuttingDownError("server shutting down") from None
        raise RejectedRequestError(
            f"the request's body did not arrive in time (no data for {timeout:.0f} s)", 408
        ) from None


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next ASGI message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _unread_body(request: Request) -> bool:
    if getattr(request.state, "body_read", False):
        return False
    length = request.headers.get("content-length", "")
    return "transfer-encoding" in request.headers or (length.isdigit() and int(length) > 0)


Handler = Callable[[Request], Awaitable[Response]]


def _predict(op: str | None) -> Handler:
    """POST handler; `op` fixed by the route (`/encode`, `/decode`) or None to tell from the
    request (`protocol.operation`)."""

    async def handler(request: Request) -> Response:
        state: ServerState = request.app.state.vaelink
        start = time.perf_counter()
        timeout = state.guards.request_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        model, kind = "unknown", op or "unknown"
        state.metrics.in_flight.inc()
        hold = Hold(state.budget)
        try:
            service = state.service(request.path_params.get("model"))
            model = service.name
            state.authorize(request)
            query = protocol.parse_query(request.url.query)
            kind = op or protocol.operation(query, request.headers.get("content-type"))
            run = service.decode if kind == "decode" else service.encode
            response = await run(request, query, hold, state, deadline)
            # The answer's body counts until it has been sent.
            response.background = BackgroundTask(hold.release)
        except Exception as error:
            hold.release()
            status, message, headers = status_of(error)
            if _unread_body(request):  # refused before its body was read: not worth reading
                headers["Connection"] = "close"
            response = error_response(status, message, headers)
        except BaseException:
            hold.release()
            raise
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
    """Starlette's 404 and 405 as the protocol's JSON errors. `/{model}` routes match any first
    segment: a wrong method there is a 405 only when the model is served (`GET /nope`: 404)."""
    assert isinstance(exc, HTTPException)
    model = request.path_params.get("model")
    unknown = model is not None and model not in request.app.state.vaelink.services
    if exc.status_code == 405 and unknown:
        return error_response(404, "Not Found")
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _auth_or_internal_error(request: Request, exc: Exception) -> Response:
    status, message, headers = status_of(exc)
    return error_response(status, message, headers)


def create_app(
    engines: Mapping[str, Engine],
    *,
    limits: Limits | None = None,
    batching: Batching | None = None,
    token: str | None = None,
    guards: Guards | None = None,
) -> Starlette:
    """The server for `engines` (served name -> engine). One model answers at `/` as well as at
    `/<name>/`; several only at `/<name>/`. `token`: require `Authorization: Bearer <token>`
    (surrounding whitespace stripped). `guards`: the in-flight budget, work limits and timeouts."""
    if not engines:
        raise ValueError("serve at least one model")
    if token is not None:
        token = token.strip()
        if not token:
            raise ValueError("the token is empty")
    limits = limits or Limits()
    batching = batching or Batching()
    guards = guards or Guards()
    gpu = any(engine.provider == "cuda" for engine in engines.values())
    metrics_ = Metrics(gpu=gpu)
    budget = Budget(
        guards.max_inflight_bytes or default_inflight_bytes(), metrics_.inflight_bytes.set
    )
    services = {
        name: ModelService(name, engine, limits, batching, metrics_, guards, budget)
        for name, engine in engines.items()
    }
    state = ServerState(services, limits, batching, token, metrics_, guards, budget)

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
