"""The `vaelink` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from . import image, processing, wire
from .errors import VaelinkError

T = TypeVar("T")


def _timed(label: str, fn: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = fn()
    print(f"  {label:<44} {1000 * (time.perf_counter() - start):8.2f} ms")
    return result


def _sample_photo() -> Path:
    try:
        from skimage import data
    except ImportError:
        raise SystemExit(
            "no photo given and scikit-image (which ships sample photos) is not installed: "
            "pass a JPEG, PNG or WebP file"
        ) from None
    return Path(data.__file__).parent / "astronaut.png"


def demo(args: argparse.Namespace) -> int:
    """Runs the codec path a VAE request takes, on a real photo, and writes what it produced."""
    path = Path(args.image) if args.image else _sample_photo()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    data = path.read_bytes()
    info = image.probe_image(data)
    print(f"{path.name}: {info.format} {info.width}x{info.height}, {len(data)} bytes")
    pixels = _timed("decode", lambda: image.decode_image(data))
    fitted = _timed("fit to a multiple of 8 (centre crop)", lambda: image.fit_to_multiple(pixels))
    tensor = _timed(
        "preprocess -> float16 NCHW in [-1, 1]", lambda: processing.preprocess(fitted, "float16")
    )
    body = _timed(
        "wire body (bfloat16)", lambda: wire.to_wire(tensor.astype(np.float32), "bfloat16")
    )
    packed = _timed("zstd + byte-shuffle", lambda: wire.compress(tensor))
    back = _timed("postprocess -> uint8 NHWC", lambda: processing.postprocess(tensor))[0]
    png = _timed("encode PNG (fast)", lambda: image.encode_image(back, "png"))
    jpeg = _timed("encode JPEG (quality 90)", lambda: image.encode_image(back, "jpeg", quality=90))
    webp = _timed("encode WebP (lossless)", lambda: image.encode_image(back, "webp"))
    for name, encoded in (
        ("roundtrip.png", png),
        ("roundtrip.jpg", jpeg),
        ("roundtrip.webp", webp),
    ):
        (out / name).write_bytes(encoded)
    exact = np.array_equal(back, fitted)
    print(
        f"tensor {tensor.shape} {tensor.dtype}; bfloat16 body {len(body.body)} bytes; "
        f"compressed {len(packed)} of {tensor.nbytes} bytes"
    )
    print(f"pixels -> tensor -> pixels is exact: {exact}; outputs in {out}/")
    return 0 if exact else 1


def models(args: argparse.Namespace) -> int:
    """Lists the model cards and which of them are exported on this machine."""
    from .registry import list_cards
    from .store import CorruptExportError, ModelNotExportedError, find_export, read_manifest

    print(f"{'model':<10} {'architecture':<16} {'latent':>6}  {'exported':<28} description")
    for card in list_cards():
        try:
            folder = find_export(card.name)
            status = ",".join(read_manifest(folder, verify=False).variants)
        except ModelNotExportedError:
            status = "-"
        except CorruptExportError:
            status = "corrupt: export again"
        print(
            f"{card.name:<10} {card.architecture:<16} {card.latent_channels:>6}  {status:<28} "
            f"{card.description}"
        )
    return 0


def export(args: argparse.Namespace) -> int:
    """Exports a model's VAE to ONNX (needs torch and diffusers, and the weights)."""
    from .export import export_model

    folder = export_model(
        args.model,
        source=args.source,
        revision=args.revision,
        output=Path(args.output) if args.output else None,
        variants=args.variants.split(","),
    )
    print(f"exported {args.model} to {folder}")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Serves models over the Hugging Face remote-VAE protocol until interrupted."""
    import importlib.util

    from .server import Batching, Limits
    from .server import serve as run_server

    for package in ("starlette", "uvicorn", "prometheus_client"):
        if importlib.util.find_spec(package) is None:
            raise SystemExit(
                f"vaelink serve needs the serve extra ({package} is missing): "
                "pip install 'vaelink[serve]'"
            )
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_pixels=args.max_pixels,
        tile_above_pixels=args.tile_above_pixels,
        max_batch=args.max_request_batch,
    )
    batching = Batching(
        enabled=not args.no_batching,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
    )
    token = args.token or os.environ.get("VAELINK_TOKEN") or None
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"vaelink: warning: serving on {args.host} without a token", file=sys.stderr)
    run_server(
        args.model,
        host=args.host,
        port=args.port,
        provider=args.provider,
        token=token,
        limits=limits,
        batching=batching,
        warmup=not args.no_warmup,
        graceful_timeout=args.graceful_timeout,
        log_level=args.log_level,
    )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_serve(commands: argparse._SubParsersAction) -> None:
    # Plain dataclasses: no serve dependency is imported to build the parser.
    from .server import Batching, Limits

    d, b = Limits(), Batching()
    p = commands.add_parser(
        "serve", help="serve models over the Hugging Face remote-VAE protocol (needs [serve])"
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="a model name (exported or bundled) or an export folder; repeat for several",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_positive, default=8000)
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--token", help="require `Authorization: Bearer TOKEN` (or set VAELINK_TOKEN)")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / (1 << 20))
    p.add_argument("--max-pixels", type=_positive, default=d.max_pixels, help="per image")
    p.add_argument(
        "--tile-above-pixels",
        type=_positive,
        default=d.tile_above_pixels,
        help="images larger than this are encoded/decoded tiled",
    )
    p.add_argument(
        "--max-request-batch", type=_positive, default=d.max_batch, help="images in one request"
    )
    p.add_argument(
        "--max-batch", type=_positive, default=b.max_batch, help="images in one engine call"
    )
    p.add_argument("--max-wait-ms", type=float, default=b.max_wait_ms, help="batching wait")
    p.add_argument(
        "--max-queue", type=_positive, default=b.max_queue, help="waiting requests; then 503"
    )
    p.add_argument("--no-batching", action="store_true", help="one request per engine call")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up encode/decode")
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds to finish requests in flight on shutdown",
    )
    p.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    p.set_defaults(run=serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaelink", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="run the image <-> tensor path on a photo")
    p.add_argument("image", nargs="?", help="a JPEG, PNG or WebP (default: a sample photo)")
    p.add_argument("-o", "--output", default="vaelink-demo", help="output folder")
    p.set_defaults(run=demo)
    p = commands.add_parser("models", help="list the known models and what is exported")
    p.set_defaults(run=models)
    p = commands.add_parser("export", help="export a model's VAE to ONNX (needs torch)")
    p.add_argument("model", help="a model name from `vaelink models`")
    p.add_argument("--source", help="another hub repo id, a diffusers folder or a checkpoint file")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--output", help="export folder (default: the vaelink cache)")
    p.add_argument(
        "--variants",
        default="float32,float16",
        help="comma-separated: float32, float16, float16-cuda",
    )
    p.set_defaults(run=export)
    _add_serve(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (VaelinkError, OSError) as e:
        print(f"vaelink: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
