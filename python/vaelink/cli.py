"""The `vaelink` command line."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import image
from .cards import DEFAULT_MODEL
from .errors import RemoteError, RemoteRequestError, VaelinkError, VaelinkWarning

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

LOCAL_RAY = "local"
"""`--ray` without an address: a local cluster started by the command."""


def demo(args: argparse.Namespace) -> int:
    """Encodes and decodes a photo with the bundled model (offline) and writes a side-by-side."""
    from .demo import run

    run(Path(args.image) if args.image else None, Path(args.output), args.model)
    return 0


def models(args: argparse.Namespace) -> int:
    """Lists the model cards and which of them are exported on this machine, then the exports of
    models that are none of the cards (custom VAEs, imported or pulled ones); `--json`: the same
    as a JSON list of cards, each with `exported` (its variants, `null`, or `"corrupt"`)."""
    import dataclasses

    from .cards import list_cards
    from .errors import CorruptExportError, ModelNotExportedError
    from .exports import find_export, list_exports, read_manifest

    rows: list[tuple[Any, list[str] | str | None]] = []
    cards = list_cards()
    for card in cards:
        try:
            status: list[str] | str | None = list(
                read_manifest(find_export(card.name), verify=False).variants
            )
        except ModelNotExportedError:
            status = None
        except CorruptExportError:
            status = "corrupt"
        rows.append((card, status))
    names = {card.name for card in cards}
    for card, folder in list_exports():
        if card.name not in names:
            rows.append((card, list(read_manifest(folder, verify=False).variants)))
    if args.json:
        listing = [{**dataclasses.asdict(card), "exported": status} for card, status in rows]
        print(json.dumps(listing, indent=2))
        return 0
    width = max(len("model"), *(len(card.name) for card, _ in rows))
    print(f"{'model':<{width}} {'architecture':<16} {'latent':>6}  {'exported':<28} description")
    for card, status in rows:
        shown = _exported_column(status)
        print(
            f"{card.name:<{width}} {card.architecture:<16} {card.latent_channels:>6}  "
            f"{shown:<28} {card.description}"
        )
    return 0


def export(args: argparse.Namespace) -> int:
    """Exports a VAE to ONNX (needs torch and diffusers, and the weights); optionally publishes
    the export on the Hugging Face Hub."""
    from .export import export_model

    folder = export_model(
        args.model,
        name=args.name,
        source=args.source,
        revision=args.revision,
        subfolder=args.subfolder,
        output=Path(args.output) if args.output else None,
        variants=args.variants.split(","),
    )
    print(f"exported {args.name or args.model} to {folder}")
    if args.push_to_hub:
        from .hub import push

        url = push(folder, args.push_to_hub, private=args.private or None)
        print(f"published {folder} as {args.push_to_hub}: {url}")
    return 0


def import_command(args: argparse.Namespace) -> int:
    """Makes an ONNX Runtime / optimum export (vae_encoder/, vae_decoder/) a vaelink export."""
    from .imports import import_onnx

    folder = import_onnx(
        Path(args.path),
        name=args.name,
        card=args.card,
        output=Path(args.output) if args.output else None,
        variants=args.variants.split(",") if args.variants else None,
    )
    print(f"imported {args.path} as {folder.name} into {folder}")
    return 0


def pull(args: argparse.Namespace) -> int:
    """Fetches a vaelink export published on the Hub, verifies it, makes it usable by name."""
    from .exports import read_manifest
    from .hub import pull as pull_export

    folder = pull_export(args.repo_id, revision=args.revision, name=args.name)
    card = read_manifest(folder, verify=False).card
    print(f"pulled {args.repo_id} as {args.name or card.name} into {folder}")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Serves models over the Hugging Face remote-VAE protocol until interrupted."""
    import importlib.util

    from .server import Batching, Guards, Limits
    from .server import serve as run_server

    if args.environment_errors:  # found while building the parser: reported for `serve` only
        print(f"vaelink serve: error: {args.environment_errors[0]}", file=sys.stderr)
        return 2
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
        max_request_pixels=int(args.max_request_megapixels * 1e6),
    )
    guards = Guards(
        max_inflight_bytes=int(args.max_inflight_mb * (1 << 20)) if args.max_inflight_mb else None,
        max_queued_pixels=int(args.max_queued_megapixels * 1e6),
        body_timeout=args.body_timeout,
        request_timeout=args.request_timeout or None,
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
        keep_alive=args.keep_alive,
    )
    batching = Batching(
        enabled=not args.no_batching,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
    )
    token = _serve_token(args)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"vaelink: warning: serving on {args.host} without a token", file=sys.stderr)
    if args.ray is not None:
        return _serve_on_ray(args, token=token, limits=limits, batching=batching, guards=guards)
    run_server(
        args.model or [DEFAULT_MODEL],
        host=args.host,
        port=args.port,
        provider=args.provider,
        cudnn_search=args.cudnn_search,
        token=token,
        limits=limits,
        batching=batching,
        guards=guards,
        warmup=not args.no_warmup,
        graceful_timeout=args.graceful_timeout,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    return 0


def _serve_on_ray(args: argparse.Namespace, **settings: Any) -> int:
    """`vaelink serve --ray`: the same app as Ray Serve replicas, until interrupted."""
    try:
        from .server import ray_serve
    except ImportError as error:
        raise SystemExit(f"vaelink: {error}") from None
    replicas = ray_serve.Replicas(
        count=args.replicas,
        autoscale=args.autoscale,
        gpus=args.gpus_per_replica,
        cpus=args.cpus_per_replica,
    )
    app = ray_serve.application(
        args.model or [DEFAULT_MODEL],
        provider=args.provider,
        cudnn_search=args.cudnn_search,
        warmup=not args.no_warmup,
        graceful_timeout=args.graceful_timeout,
        replicas=replicas,
        **settings,
    )
    count = f"{args.autoscale[0]}-{args.autoscale[1]}" if args.autoscale else args.replicas
    ready = f"vaelink: serving at http://{args.host}:{args.port}/ on Ray Serve ({count} replicas)"
    ray_serve.run(
        app,
        address=None if args.ray == LOCAL_RAY else args.ray,
        host=args.host,
        port=args.port,
        ingress=args.ingress,
        on_ready=lambda: print(ready, file=sys.stderr, flush=True),
    )
    return 0


def _autoscale(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not sep or not low.isdigit() or not high.isdigit():
        raise argparse.ArgumentTypeError(f"MIN:MAX, as 1:4; got {text!r}")
    return int(low), int(high)


def _serve_token(args: argparse.Namespace) -> str | None:
    """--token (visible to every user in `ps`: warned), else --token-file (or VAELINK_TOKEN_FILE),
    else VAELINK_TOKEN; surrounding whitespace (a file's newline) is not part of it."""
    if args.token:
        print(
            "vaelink: warning: --token is visible to every user of this machine (ps); "
            "use --token-file or VAELINK_TOKEN",
            file=sys.stderr,
        )
        return args.token.strip() or None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise SystemExit(f"vaelink: cannot read --token-file: {e}") from None
        if not token:
            raise SystemExit(f"vaelink: --token-file {args.token_file} is empty")
        return token
    return os.environ.get("VAELINK_TOKEN", "").strip() or None


class _AppendOverDefault(argparse._AppendAction):
    """`append` that starts afresh instead of after its default: `--model` on the command line
    replaces VAELINK_MODEL's list rather than adding to it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, None)
        super().__call__(parser, namespace, values, option_string)


def _variable(action: argparse.Action) -> str | None:
    """`--max-batch` -> VAELINK_MAX_BATCH. Not --token: VAELINK_TOKEN is read without its warning."""
    long = [option for option in action.option_strings if option.startswith("--")]
    if not long or action.dest in ("help", "token"):
        return None
    return "VAELINK_" + long[0][2:].upper().replace("-", "_")


def _from_variable(action: argparse.Action, text: str) -> Any:
    """An option's value from its variable: a list comma-separated, a flag 1/true/yes/on or
    0/false/no/off; converted and checked as on the command line."""
    if isinstance(action, argparse._StoreTrueAction):
        yes, no = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
        if text.lower() not in yes + no:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(yes + no)}")
        return text.lower() in yes
    convert = action.type if callable(action.type) else str
    if isinstance(action, argparse._AppendAction):
        return [convert(item.strip()) for item in text.split(",") if item.strip()]
    value = convert(text)
    if action.choices is not None and value not in action.choices:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(map(str, action.choices))}")
    return value


def _environment_defaults(parser: argparse.ArgumentParser) -> list[str]:
    """Sets each option's default from its variable, when set and not empty: the command line
    still overrides it, and --help shows it. Returns the errors, for the command to report (a bad
    variable must not break the other commands, which build this parser too)."""
    errors = []
    for action in parser._actions:
        name = _variable(action)
        text = os.environ.get(name, "").strip() if name else ""
        if not text:
            continue
        try:
            action.default = _from_variable(action, text)
        except argparse.ArgumentTypeError as e:
            errors.append(f"{name}={text!r}: {e}")
        except (TypeError, ValueError):
            errors.append(f"{name}={text!r}: not a valid value for {action.option_strings[-1]}")
    return errors


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_serve(commands: Subcommands) -> None:
    # Plain dataclasses: no serve dependency is imported to build the parser.
    from .server import Batching, Guards, Limits

    d, b, g = Limits(), Batching(), Guards()
    p = commands.add_parser(
        "serve",
        help="serve models over the Hugging Face remote-VAE protocol (needs [serve])",
        description="Every option can also come from an environment variable, VAELINK_ and its "
        "name (VAELINK_PORT=8080, VAELINK_MODEL=sdxl,flux1, VAELINK_NO_BATCHING=1): the command "
        "line overrides it, the defaults shown include it.",
    )
    p.add_argument(
        "--model",
        action=_AppendOverDefault,
        help="a model name (exported or bundled) or an export folder; repeat for several; none: "
        f"the bundled {DEFAULT_MODEL}, so that `vaelink serve` works offline as is",
    )
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=_positive, default=8000, help="the port to listen on")
    p.add_argument(
        "--provider", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if seen"
    )
    p.add_argument(
        "--cudnn-search",
        choices=("heuristic", "exhaustive", "default"),
        default="heuristic",
        help="how cuDNN picks convolution kernels per new shape on CUDA: exhaustive searches "
        "(seconds per shape, then the fastest kernels); the tile shape is warmed up at start",
    )
    token = p.add_mutually_exclusive_group()
    token.add_argument(
        "--token-file",
        metavar="PATH",
        help="require `Authorization: Bearer TOKEN`, the token read from PATH (or set VAELINK_TOKEN)",
    )
    token.add_argument("--token", help="the token itself: visible in `ps`, prefer --token-file")
    p.add_argument(
        "--max-body-mb", type=float, default=d.max_body_bytes / (1 << 20), help="per request"
    )
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
    p.add_argument(
        "--max-request-megapixels",
        type=_positive_float,
        default=d.max_request_pixels / 1e6,
        help="pixels of all images of one request (413 beyond)",
    )
    p.add_argument(
        "--max-queued-megapixels",
        type=_positive_float,
        default=g.max_queued_pixels / 1e6,
        help="work queued or running per model (503 beyond)",
    )
    p.add_argument(
        "--max-inflight-mb",
        type=_positive_float,
        help="bodies, arrays and engine memory held at once (503 beyond; default: half the "
        "available RAM)",
    )
    p.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=g.body_timeout,
        help="seconds without body data before 408",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=g.request_timeout,
        help="seconds from arrival to answer before 504, work dropped (0: none)",
    )
    p.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=g.header_timeout,
        help="seconds for a request's headers before the connection is closed",
    )
    p.add_argument(
        "--max-connections",
        type=_positive,
        default=g.max_connections,
        help="open connections; requests beyond are answered 503",
    )
    p.add_argument(
        "--keep-alive", type=_positive, default=g.keep_alive, help="idle seconds per connection"
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up encode/decode")
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds to finish requests in flight on shutdown",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="info: the models and the address once listening, and every request",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="json: one object per line (time, level, logger, message), the access log's too",
    )
    ray = p.add_argument_group(
        "Ray Serve (needs [ray-serve])",
        "the same app as Ray Serve replicas; the connection guards (--header-timeout, "
        "--max-connections, --keep-alive) are then the ingress's",
    )
    ray.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL_RAY,
        metavar="ADDRESS",
        help="serve on a Ray cluster: ADDRESS (auto, HOST:PORT, ray://HOST:10001), or without "
        "one a local cluster started here (or RAY_ADDRESS's)",
    )
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=_positive, default=1, help="replicas to run")
    scale.add_argument(
        "--autoscale", type=_autoscale, metavar="MIN:MAX", help="let Serve scale between these"
    )
    ray.add_argument("--gpus-per-replica", type=float, default=0.0, help="fractions share a GPU")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0)
    ray.add_argument(
        "--ingress",
        choices=("proxy", "haproxy"),
        default="proxy",
        help="Serve's Python proxy, or HAProxy (a cluster started here only)",
    )
    p.set_defaults(run=serve, environment_errors=_environment_defaults(p))


# -- encode / decode ----------------------------------------------------------------------------

LATENTS_FORMAT = "vaelink-latents/1"


def _vae(args: argparse.Namespace, model: str) -> Any:
    from .api import VAE

    try:
        vae = VAE(
            model,
            args.endpoint or None,
            token=args.token,
            timeout=args.timeout,
            retries=args.retries,
            provider=args.provider,
        )
    except (TypeError, ValueError) as error:  # endpoints and tokens that do not fit together
        raise SystemExit(f"vaelink: error: {error}") from None
    if vae.targets == ("local",):
        vae.engine  # noqa: B018 - load the model now: a missing model is one error, not one per file
    return vae


def _progress(total: int, unit: str, quiet: bool) -> Any:
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, pipes, CI).
    return tqdm(total=total, unit=unit, disable=True if quiet else None, dynamic_ncols=True)


def _report(bar: Any, what: str, error: BaseException) -> None:
    bar.write(f"vaelink: skipped {what}: {error}", file=sys.stderr)


def _skippable(error: BaseException) -> bool:
    """Errors that concern one input (reported, skipped) rather than the whole run."""
    if isinstance(error, RemoteError):
        return isinstance(error, RemoteRequestError)
    return isinstance(error, VaelinkError | OSError)


def _ordered(jobs: int, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
    """`(item, result or exception)` in input order, `jobs` at a time."""

    def guarded(item: Any) -> Any:
        try:
            return fn(item)
        except Exception as error:
            return error

    if jobs <= 1:
        for item in items:
            yield item, guarded(item)
        return
    pool = ThreadPoolExecutor(jobs, thread_name_prefix="vaelink-cli")
    try:
        yield from zip(items, pool.map(guarded, items), strict=True)
    finally:  # stopped early (Ctrl-C, an error): drop what has not started, wait for nothing
        pool.shutdown(wait=False, cancel_futures=True)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _image_files(paths: Sequence[str]) -> list[str]:
    """The files given, with every folder replaced by the images under it (recursively, by
    suffix, sorted). A file given by name is kept whatever its suffix: it is reported if it
    cannot be read."""
    files: list[str] = []
    for path in paths:
        if Path(path).is_dir():
            found = (p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files += sorted(str(p) for p in found if p.is_file())
        else:
            files.append(path)
    return files


def encode_command(args: argparse.Namespace) -> int:
    """Encodes image files (and the images in folders) into one safetensors file: a tensor
    `latents.<i>` `[1, C, h, w]` per image, and metadata naming the model, the source files and
    their sizes. A run stopped midway (Ctrl-C, an endpoint that fails) keeps the images already
    encoded, in order, in a file marked `"complete": "false"`."""
    from .latents_file import save_latents

    paths = _image_files(args.images)
    if not paths:
        print("vaelink: error: no images found in " + " ".join(args.images), file=sys.stderr)
        return 1
    vae = _vae(args, args.model or DEFAULT_MODEL)
    jobs = args.jobs or (1 if vae.targets == ("local",) else 4)

    def encode_one(path: str) -> tuple[Any, tuple[int, int]]:
        pixels = image.decode_image(path, strict=args.strict)
        latents = vae.encode(pixels, sample=args.sample, seed=args.seed, fit=args.fit)
        return latents, (pixels.shape[1], pixels.shape[0])

    encoded: list[tuple[str, Any, tuple[int, int]]] = []  # (file, latents, size)
    failed = 0

    def save(complete: bool) -> None:
        metadata = {
            "format": LATENTS_FORMAT,
            "model": vae.card.name,
            "scaling_factor": repr(vae.card.scaling_factor),
            "shift_factor": repr(vae.card.shift_factor),
            "files": json.dumps([file for file, _, _ in encoded]),
            "sizes": json.dumps([size for _, _, size in encoded]),
            "sample": json.dumps(args.sample),
            "seed": json.dumps(args.seed),
            "complete": json.dumps(complete),
        }
        tensors = {f"latents.{i}": latents for i, (_, latents, _) in enumerate(encoded)}
        save_latents(args.output, tensors, metadata)

    try:
        with _progress(len(paths), "image", args.quiet) as bar:
            for path, result in _ordered(jobs, encode_one, paths):
                bar.update()
                if isinstance(result, BaseException):
                    if not _skippable(result):
                        raise result
                    _report(bar, path, result)
                    failed += 1
                else:
                    encoded.append((path, *result))
    except BaseException:
        if encoded:  # what was finished is kept; the error or Ctrl-C is then reported by main
            save(complete=False)
            done = f"{len(encoded)} of {len(paths)}"
            print(f"vaelink: kept the {done} images encoded in {args.output}", file=sys.stderr)
        raise
    if not encoded:
        print(f"vaelink: error: none of the {len(paths)} images was encoded", file=sys.stderr)
        return 1
    save(complete=True)
    summary = f"encoded {len(encoded)} of {len(paths)} images into {args.output}"
    print(summary + (f"; {failed} skipped" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def _latent_items(tensors: dict[str, Any], metadata: dict[str, str]) -> list[tuple[str, Any]]:
    """`(output stem, [1, ...] latents)` for every image in a latents file: vaelink's own
    `latents.<i>` tensors named after their source files, and any other tensor's batch items."""
    try:
        sources = json.loads(metadata.get("files", "[]"))
    except ValueError:
        sources = []
    items: list[tuple[str, Any]] = []
    for name, tensor in tensors.items():
        index = name.removeprefix("latents.")
        if index.isdigit() and int(index) < len(sources) and tensor.shape[:1] == (1,):
            items.append((Path(str(sources[int(index)])).stem or name, tensor))
        elif tensor.ndim >= 1 and tensor.shape[0] > 1:
            items += [(f"{name}-{j}", tensor[j : j + 1]) for j in range(tensor.shape[0])]
        else:
            items.append((name, tensor))
    return items


def _unique(stem: str, taken: set[str]) -> str:
    name, n = stem, 1
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    taken.add(name)
    return name


def decode_command(args: argparse.Namespace) -> int:
    """Decodes latents files written by `vaelink encode` (or any safetensors of latents) into
    image files named after the images they came from."""
    from .files import atomic_write_bytes
    from .latents_file import load_latents

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, str, Any]] = []  # (model, stem, latents)
    failed = 0
    for path in args.latents:
        try:
            tensors, metadata = load_latents(path)
        except (VaelinkError, OSError) as error:
            print(f"vaelink: skipped {path}: {error}", file=sys.stderr)
            failed += 1
            continue
        model = args.model or metadata.get("model") or DEFAULT_MODEL
        jobs += [(model, stem, z) for stem, z in _latent_items(tensors, metadata)]
    vaes: dict[str, Any] = {}
    taken: set[str] = set()
    named = [(model, _unique(stem, taken), z) for model, stem, z in jobs]
    remote = bool(args.endpoint) and args.endpoint != ["local"]

    def decode_one(job: tuple[str, str, Any]) -> Path:
        model, stem, z = job
        (encoded,) = vaes[model].decode(z, output=args.format, quality=args.quality)
        target = out / f"{stem}.{'jpg' if args.format == 'jpeg' else args.format}"
        atomic_write_bytes(target, encoded)  # Ctrl-C leaves no half image
        return target

    for model in {model for model, _, _ in named}:
        vaes[model] = _vae(args, model)
    written = 0
    with _progress(len(named), "image", args.quiet) as bar:
        for job, result in _ordered(args.jobs or (4 if remote else 1), decode_one, named):
            bar.update()
            if isinstance(result, BaseException):
                if not _skippable(result):
                    raise result
                _report(bar, job[1], result)
                failed += 1
            else:
                written += 1
    summary = f"decoded {written} of {len(named)} images into {out}/"
    print(summary + (f"; {failed} skipped" if failed else ""), file=sys.stderr)
    return 1 if failed or not named else 0


def _add_remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"a model name or an export folder (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--endpoint",
        action="append",
        help="a remote-VAE endpoint URL, or 'local'; repeat for fallbacks tried in order "
        "(default: the local engine)",
    )
    p.add_argument("--token", help="bearer token (default: VAELINK_TOKEN or HF_TOKEN)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds one image may take in all (retries and fallbacks included)",
    )
    p.add_argument("--retries", type=int, default=3, help="on connection errors, 429 and 503")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("-j", "--jobs", type=int, help="images in flight (default: 4 remote, 1 local)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_encode_decode(commands: Subcommands) -> None:
    p = commands.add_parser("encode", help="encode image files into a latents file")
    p.add_argument(
        "images", nargs="+", help="JPEG, PNG or WebP files, or folders (searched recursively)"
    )
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    _add_remote_options(p)
    p.add_argument("--fit", choices=("crop", "resize"), default="crop", help="to a multiple of 8")
    p.add_argument("--sample", action="store_true", help="sample the posterior (default: mean)")
    p.add_argument("--seed", type=int, help="seed for --sample")
    p.add_argument(
        "--strict", action="store_true", help="a truncated JPEG fails (default: a warning)"
    )
    p.set_defaults(run=encode_command)
    p = commands.add_parser("decode", help="decode a latents file into image files")
    p.add_argument("latents", nargs="+", help=".safetensors files (from vaelink encode)")
    p.add_argument("-o", "--output", required=True, help="the folder to write images to")
    _add_remote_options(p)
    p.add_argument("--format", choices=("png", "jpeg", "webp"), default="png")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.set_defaults(run=decode_command)


# -- dataset ------------------------------------------------------------------------------------


def dataset_command(args: argparse.Namespace) -> int:
    try:
        from .dataset import encode_dataset
    except ImportError as error:  # pyarrow or Pillow missing
        raise SystemExit(
            f"vaelink: error: {error.name} is missing: pip install 'vaelink[dataset]'"
        ) from None
    if args.ray is not False and importlib.util.find_spec("ray") is None:
        raise SystemExit("vaelink: error: ray is missing: pip install 'vaelink[ray]'")
    report = encode_dataset(
        args.src,
        args.output,
        model=args.model or DEFAULT_MODEL,
        endpoint=args.endpoint or None,
        token=args.token,
        provider=args.provider,
        resolution=args.resolution,
        step=args.step,
        min_side=args.min_side,
        max_side=args.max_side,
        mode=args.mode,
        no_upscale=args.no_upscale,
        flip=args.flip,
        sample=args.sample,
        seed=args.seed,
        dtype=args.dtype,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        threads=args.jobs,
        max_pixels=args.max_pixels,
        image_column=args.image_column,
        key_column=args.key_column,
        progress=False if args.quiet else None,
        ray=args.ray,
        ray_actors=args.ray_actors,
    )
    for item in report.skipped:
        print(f"vaelink: skipped {item['key']}: {item['reason']}", file=sys.stderr)
    print(
        f"{report.folder}: {report.rows} rows; encoded {report.encoded}, cached {report.cached}, "
        f"skipped {len(report.skipped)}, retired {report.retired}, "
        f"non-finite re-encoded {len(report.nonfinite)} ({report.seconds:.1f} s)"
    )
    return 1 if args.strict and report.skipped else 0


def _add_dataset(commands: Subcommands) -> None:
    p = commands.add_parser(
        "dataset",
        help="encode a whole dataset to cached latents (resumable Parquet shards)",
        description="Encode every image of SRC (a folder, a list file, Parquet or WebDataset "
        "shards) into Parquet shards of latents under OUT; run again to resume. "
        "Needs pip install 'vaelink[dataset]'.",
    )
    p.add_argument(
        "src",
        help="a folder, a list file, a .parquet file/folder, .tar shards, hf:NAME[:SPLIT] "
        "or a datasets save_to_disk folder",
    )
    p.add_argument("-o", "--output", required=True, help="the cache folder")
    _add_remote_options(p)
    p.add_argument("--resolution", type=int, default=1024, help="bucket area = resolution^2")
    p.add_argument("--step", type=int, default=64, help="bucket sides are multiples of this")
    p.add_argument("--min-side", type=int, help="default: resolution / 2")
    p.add_argument("--max-side", type=int, help="default: resolution * 2")
    p.add_argument("--mode", choices=("crop", "resize"), default="crop", help="fit to the bucket")
    p.add_argument("--no-upscale", action="store_true", help="never enlarge an image")
    p.add_argument("--flip", action="store_true", help="also encode the horizontal flip")
    p.add_argument("--sample", action="store_true", help="sample the posterior (default: mean)")
    p.add_argument("--seed", type=int, default=0, help="for --sample (per item, from its key)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--batch-size", type=int, default=8, help="images per engine call")
    p.add_argument("--shard-size", type=int, default=1024, help="rows per Parquet shard")
    p.add_argument("--max-pixels", type=int, default=image.DEFAULT_MAX_PIXELS)
    p.add_argument("--image-column", help="Parquet: the column of image bytes")
    p.add_argument("--key-column", help="Parquet: the column of item keys")
    p.add_argument("--strict", action="store_true", help="exit 1 when any input was skipped")
    p.add_argument(
        "--ray",
        nargs="?",
        const=True,
        default=False,
        metavar="ADDRESS",
        help="encode on a Ray cluster with Ray Data (pip install 'vaelink[ray]'): ADDRESS, or "
        "RAY_ADDRESS, or a new local one",
    )
    p.add_argument(
        "--ray-actors", type=int, help="with --ray: how many actors (default: one per GPU or node)"
    )
    p.set_defaults(run=dataset_command)


def doctor(args: argparse.Namespace) -> int:
    """`vaelink doctor [--json]`: exit 1 when it finds a problem."""
    from .doctor import print_report

    return print_report(args.json)


def _exported_column(status: list[str] | str | None) -> str:
    """The `models` table's cell: the exported variants, "-" for none, or what is wrong."""
    if status is None:
        return "-"
    if status == "corrupt":
        return "corrupt: export again"
    return ",".join(status)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless the help already says it or there is
    none to show (None, False: "off")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        if not action.option_strings and action.nargs not in ("?", "*"):
            return action.help
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vaelink", description=__doc__, formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"vaelink {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "demo", help="encode and decode a photo with the bundled model; write a side-by-side"
    )
    p.add_argument("image", nargs="?", help="a JPEG, PNG or WebP (default: a sample photo)")
    p.add_argument("-o", "--output", default="vaelink-demo", help="output folder")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a model name or export folder")
    p.set_defaults(run=demo)
    p = commands.add_parser("models", help="list the known models and what is exported")
    p.add_argument("--json", action="store_true", help="as JSON: the cards and their exports")
    p.set_defaults(run=models)
    p = commands.add_parser(
        "doctor",
        help="what will run here: runtimes, providers that load, CUDA libraries, GPUs, exports",
    )
    p.add_argument("--json", action="store_true", help="as JSON, for bug reports")
    p.set_defaults(run=doctor)
    p = commands.add_parser("export", help="export a model's VAE to ONNX (needs torch)")
    p.add_argument(
        "model",
        nargs="?",
        help="the card it is exported as (`vaelink models`); none with --name: a custom VAE",
    )
    p.add_argument("--source", help="another hub repo id, a diffusers folder or a checkpoint file")
    p.add_argument(
        "--name", help="the name to store it as (a VAE that is none of the cards: with --source)"
    )
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument(
        "--subfolder", help="the VAE's folder in the repo (default: the card's, or vae/)"
    )
    p.add_argument("--output", help="export folder (default: the vaelink cache)")
    p.add_argument(
        "--variants",
        default="float32,float16",
        help="comma-separated: float32, float16, float16-cuda",
    )
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="then publish the export as REPO_ID")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    p.set_defaults(run=export)
    p = commands.add_parser(
        "import", help="use an ONNX Runtime / optimum export (vae_encoder/, vae_decoder/) as is"
    )
    p.add_argument("path", help="the folder holding vae_encoder/model.onnx, vae_decoder/model.onnx")
    p.add_argument("--name", help="the name to use it by (default: its card's, or the folder's)")
    p.add_argument("--card", help="the card it is (default: derived from its config.json)")
    p.add_argument("--output", help="export folder (default: the vaelink cache)")
    p.add_argument("--variants", help="the graphs' dtype (default), and float16 (needs onnx)")
    p.set_defaults(run=import_command)
    p = commands.add_parser(
        "pull", help="fetch a vaelink export published on the Hugging Face Hub (no torch needed)"
    )
    p.add_argument("repo_id", help="the Hub repo holding the export (manifest.json at its root)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--name", help="the name to use it by (default: its card's)")
    p.set_defaults(run=pull)
    _add_encode_decode(commands)
    _add_serve(commands)
    _add_dataset(commands)
    for command in commands.choices.values():
        command.formatter_class = _HelpFormatter
    return parser


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """vaelink's own warnings as one `vaelink: warning:` line each; others as Python shows them."""
    shown = warnings.showwarning

    def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if issubclass(category, VaelinkWarning):
            print(f"vaelink: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _warnings_as_lines():
            return int(args.run(args))
    except (VaelinkError, OSError) as e:
        print(f"vaelink: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's code for SIGINT, no traceback
        print("vaelink: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
