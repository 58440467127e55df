"""`encode_dataset`: a source of images -> a resumable, versioned cache of latents.

Decoding (Rust, GIL released), hashing and resizing (Rust's Lanczos3, GIL released) run in a thread pool
while the engine (ONNX Runtime, GIL released) or the endpoints encode batches of one bucket; one
thread writes the shards. See `vaelink.dataset.store` for what is on disk and why it survives a
`kill -9`."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..api import VAE, Endpoints, Token
from ..cards import DEFAULT_MODEL
from ..dtypes import numpy_dtype
from ..engine import LOGVAR_RANGE, Engine, Provider
from ..errors import ModelError, NonFiniteOutputError, VaelinkError
from ..exports import ModelLike
from ..image import DEFAULT_MAX_PIXELS, decode_image
from .buckets import BucketSpec, Placement, flipped, prepare_pixels
from .sources import SourceItem, open_source
from .store import FORMAT, ShardStore, StoredRow

__all__ = [
    "DatasetReport",
    "Encoder",
    "Prepared",
    "encode_dataset",
    "item_seed",
    "prepare_item",
    "prepare_variants",
]

LatentDType = Literal["float32", "float16", "bfloat16"]


@dataclass
class Prepared:
    """One variant of one item, ready for the model."""

    key: str
    sha256: str
    pixels: np.ndarray
    placement: Placement


@dataclass
class DatasetReport:
    """What a run did. `skipped`: `{key, reason}` of inputs not encoded (bad images, non-finite
    latents); `nonfinite`: items whose latents were non-finite and re-encoded in float32."""

    out: Path
    version: str
    encoded: int = 0
    cached: int = 0
    retired: int = 0
    rows: int = 0
    seconds: float = 0.0
    skipped: list[dict[str, str]] = field(default_factory=list)
    nonfinite: list[dict[str, str]] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.out / self.version


def prepare_item(
    data: bytes, spec: BucketSpec, buckets: list[tuple[int, int]], max_pixels: int
) -> list[tuple[np.ndarray, Placement]]:
    """Encoded image bytes -> the pixels the model gets, one per variant (the flip second)."""
    pixels = decode_image(data, max_pixels=max_pixels, strict=True)  # truncated JPEGs refused
    pixels, placement = prepare_pixels(pixels, spec, buckets)
    variants = [(pixels, placement)]
    if spec.flip:
        variants.append(flipped(pixels, placement))
    return variants


def item_seed(seed: int, key: str, flip: bool) -> int:
    """The seed of one item's posterior sample: the same whichever batch it lands in."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{int(flip)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _model_id(vae: VAE) -> str | None:
    """The export's manifest hash: a re-export with other weights is another cache version."""
    try:
        manifest = vae.model.export_folder() / "manifest.json"
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    except (ModelError, OSError):
        return None  # remote only: the card's name stands for the model


def _rotations(endpoint: Endpoints) -> list[Endpoints]:
    """One fallback list per encoding thread, each starting at another endpoint, so that the work
    spreads over all of them and each thread still falls back along the whole list."""
    if endpoint is None or isinstance(endpoint, str):
        return [endpoint]
    targets = list(endpoint)
    return [targets[i:] + targets[:i] for i in range(len(targets))] or [None]


class Encoder:
    """Prepared pixels -> rows: the model (one engine, or endpoints), a posterior sample per item's
    own seed, non-finite latents retried in float32, the row's fields. The local run holds one per
    run; each Ray actor holds its own (`vaelink.dataset.distributed`)."""

    def __init__(
        self,
        vaes: list[VAE],
        version: str,
        spec: BucketSpec,
        *,
        sample: bool,
        seed: int,
        dtype: LatentDType,
        provider: Provider,
    ) -> None:
        self.vaes, self.version, self.provider = vaes, version, provider
        self.card = vaes[0].card
        self.sample = sample and self.card.has_posterior
        self.seed, self.dtype = seed, dtype
        self.preprocess = json.dumps(spec.parameters(), sort_keys=True)
        self.nonfinite: list[dict[str, str]] = []  # `{key, flipped, action}` of float32 retries
        self._float32: Engine | None = None

    def _float32_engine(self) -> Engine:
        if self._float32 is None:
            local = next((v for v in self.vaes if v.targets == ("local",)), None)
            if local is not None and local.engine.dtype == "float32":
                self._float32 = local.engine
            else:
                self._float32 = Engine(self.vaes[0].model, provider=self.provider, dtype="float32")
        return self._float32

    def _latents(self, raw: np.ndarray, batch: Sequence[Prepared]) -> np.ndarray:
        """The encoder's output -> scaled latents (a posterior sample per item's own seed)."""
        if not self.sample:
            return raw
        c = self.card.latent_channels
        mean, logvar = raw[:, :c], raw[:, c:]
        noise = np.stack(
            [
                np.random.default_rng(
                    item_seed(self.seed, p.key, p.placement.flipped)
                ).standard_normal(mean.shape[1:], np.float32)
                for p in batch
            ]
        )
        z = mean + np.exp(0.5 * np.clip(logvar, *LOGVAR_RANGE)) * noise
        return np.asarray(self.card.scaling.apply(z), dtype=np.float32)

    def _run_model(self, model: VAE | Engine, pixels: np.ndarray) -> np.ndarray:
        out = model.moments(pixels) if self.sample else model.encode(pixels)
        return np.asarray(out, dtype=np.float32)

    def encode(
        self, vae: VAE, batch: list[Prepared]
    ) -> list[dict[str, Any] | tuple[Prepared, str]]:
        """Rows, or `(item, reason)` for items whose latents stay non-finite."""
        pixels = np.stack([p.pixels for p in batch])
        latents: np.ndarray | None
        try:
            latents = self._latents(self._run_model(vae, pixels), batch)
        except NonFiniteOutputError:
            latents = None
        out: list[dict[str, Any] | tuple[Prepared, str]] = []
        for i, item in enumerate(batch):
            z = None if latents is None else latents[i]
            if z is None or not np.isfinite(z).all():
                try:
                    raw = self._run_model(self._float32_engine(), item.pixels[None])
                    z = self._latents(raw, [item])[0]
                except (NonFiniteOutputError, ModelError) as error:
                    out.append((item, f"non-finite latents; float32 retry failed: {error}"))
                    continue
                if not np.isfinite(z).all():
                    out.append((item, "non-finite latents, also in float32"))
                    continue
                self.nonfinite.append(
                    {"key": item.key, "flipped": str(item.placement.flipped), "action": "float32"}
                )
            stored = z.astype(numpy_dtype(self.dtype))
            if not np.isfinite(stored.astype(np.float32)).all():
                out.append((item, f"latents overflow {self.dtype}"))
                continue
            out.append(self._row(item, stored))
        return out

    def _row(self, item: Prepared, z: np.ndarray) -> dict[str, Any]:
        p = item.placement
        return {
            "format": FORMAT,
            "version": self.version,
            "key": item.key,
            "sha256": item.sha256,
            "flipped": p.flipped,
            "latents": np.ascontiguousarray(z).tobytes(),
            "shape": list(z.shape),
            "dtype": self.dtype,
            "kind": "sample" if self.sample else "mean",
            "seed": item_seed(self.seed, item.key, p.flipped) if self.sample else None,
            "model": self.card.name,
            "scaling_factor": self.card.scaling_factor,
            "shift_factor": self.card.shift_factor,
            "original_size": list(p.original_size),
            "resized_size": list(p.resized_size),
            "crop_box": list(p.crop_box),
            "target_size": list(p.target_size),
            "preprocess": self.preprocess,
        }


def prepare_variants(
    key: str,
    sha: str,
    data: bytes,
    missing: set[bool],
    spec: BucketSpec,
    buckets: list[tuple[int, int]],
    max_pixels: int,
) -> list[Prepared] | str:
    """The variants of one item that are `missing` (flipped or not), or why it is skipped."""
    try:
        variants = prepare_item(data, spec, buckets, max_pixels)
    except (VaelinkError, ValueError, OSError) as error:
        return f"{type(error).__name__}: {error}"
    # A run killed between an item's variants left one of them written: only the other.
    return [
        Prepared(key, sha, p, placement)
        for p, placement in variants
        if placement.flipped in missing
    ]


class _Run:
    def __init__(
        self,
        vaes: list[VAE],
        store: ShardStore,
        spec: BucketSpec,
        config: dict[str, Any],
        *,
        sample: bool,
        seed: int,
        dtype: LatentDType,
        batch_size: int,
        shard_size: int,
        threads: int,
        max_pixels: int,
        provider: Provider,
        report: DatasetReport,
    ) -> None:
        self.vaes, self.store, self.spec, self.config = vaes, store, spec, config
        self.encoder = Encoder(
            vaes, store.version, spec, sample=sample, seed=seed, dtype=dtype, provider=provider
        )
        self.encoder.nonfinite = report.nonfinite
        self.batch_size, self.shard_size = batch_size, shard_size
        self.threads, self.max_pixels = threads, max_pixels
        self.report = report
        self.buckets = spec.buckets()
        self.variants = 2 if spec.flip else 1
        self.stored: dict[tuple[str, bool], list[StoredRow]] = {}
        for row in store.scan():
            self.stored.setdefault((row.key, row.flipped), []).append(row)
        self.current: dict[str, str] = {}  # key -> sha256 of the bytes read this run
        self.rows: list[dict[str, Any]] = []

    # -- the stages ------------------------------------------------------------------------

    def check(self, item: SourceItem) -> tuple[str, str, bytes, set[bool] | str]:
        """(key, sha256, bytes, the variants not yet stored - or why it is skipped / "cached")."""
        try:
            data = item.read()
        except OSError as error:
            return item.key, "", b"", f"unreadable: {error.strerror or error}"
        sha = hashlib.sha256(data).hexdigest()
        missing = {
            flip
            for flip in (False, True)[: self.variants]
            if not any(r.sha256 == sha for r in self.stored.get((item.key, flip), []))
        }
        return item.key, sha, data, missing or "cached"

    def prepare(self, item: SourceItem) -> tuple[str, str, list[Prepared] | str]:
        """(key, sha256, prepared variants, or why it is skipped / "cached")."""
        key, sha, data, missing = self.check(item)
        if isinstance(missing, str):
            return key, sha, missing
        return (
            key,
            sha,
            prepare_variants(key, sha, data, missing, self.spec, self.buckets, self.max_pixels),
        )

    def skip(self, key: str, reason: str, n: int, bar: Any) -> None:
        self.report.skipped.append({"key": key, "reason": reason})
        bar.update(n)

    def unique(self, items: Iterator[SourceItem], bar: Any) -> Iterator[SourceItem]:
        """The source's items, each key once (later duplicates skipped and listed)."""
        seen: set[str] = set()
        for item in items:
            if item.key in seen:
                self.skip(item.key, "duplicate key in the source", self.variants, bar)
            else:
                seen.add(item.key)
                yield item

    def checked(self, key: str, sha: str, result: Any, bar: Any) -> bool:
        """Records what `check` or `prepare` found; True when there is something to encode."""
        if sha:
            self.current[key] = sha
        if result == "cached":
            self.report.cached += 1
            bar.update(self.variants)
        elif isinstance(result, str):
            self.skip(key, result, self.variants, bar)
        else:
            bar.update(self.variants - len(result))
            return True
        return False

    def encoded(self, rows: Iterable[dict[str, Any] | tuple[Prepared, str]], bar: Any) -> None:
        """Takes an encoded batch: rows to the next shard, non-finite items to the skipped."""
        for row in rows:
            if isinstance(row, tuple):
                self.skip(row[0].key, row[1], 1, bar)
            else:
                self.rows.append(row)
                self.report.encoded += 1
                bar.update(1)
        self.flush(force=False)

    # -- the loop --------------------------------------------------------------------------

    def flush(self, force: bool) -> None:
        while self.rows and (force or len(self.rows) >= self.shard_size):
            chunk, self.rows = self.rows[: self.shard_size], self.rows[self.shard_size :]
            self.store.write(chunk)

    def run(self, items: Iterator[SourceItem], bar: Any) -> None:
        window = max(4 * self.threads, 2 * self.batch_size)
        buffered: dict[tuple[int, int], list[Prepared]] = {}
        preps: set[Future[Any]] = set()
        encodes: dict[Future[Any], int] = {}
        idle = list(range(len(self.vaes)))
        exhausted = False
        unique = self.unique(items, bar)

        def submit_encodes() -> None:
            while idle:
                full = [b for b, v in buffered.items() if len(v) >= self.batch_size]
                held = sum(len(v) for v in buffered.values())
                if full:
                    bucket = full[0]
                elif buffered and (not encodes or held >= window or (exhausted and not preps)):
                    # Nothing running (an idle engine is worse than a small batch), too much
                    # held, or nothing more to come: the fullest bucket goes as it is.
                    bucket = max(buffered, key=lambda b: len(buffered[b]))
                else:
                    return
                batch = buffered[bucket][: self.batch_size]
                buffered[bucket] = buffered[bucket][self.batch_size :]
                if not buffered[bucket]:
                    del buffered[bucket]
                worker = idle.pop(0)  # the longest idle: every endpoint gets its turn
                encodes[encoder.submit(self.encoder.encode, self.vaes[worker], batch)] = worker

        with (
            ThreadPoolExecutor(self.threads, thread_name_prefix="vaelink-prepare") as pool,
            ThreadPoolExecutor(len(self.vaes), thread_name_prefix="vaelink-encode") as encoder,
        ):
            try:
                while True:
                    held = sum(len(v) for v in buffered.values())
                    while not exhausted and len(preps) + held < window:
                        item = next(unique, None)
                        if item is None:
                            exhausted = True
                        else:
                            preps.add(pool.submit(self.prepare, item))
                    submit_encodes()
                    if not preps and not encodes:
                        break
                    done, _ = wait(preps | set(encodes), return_when=FIRST_COMPLETED)
                    for future in done:
                        if future in preps:
                            preps.discard(future)
                            key, sha, result = future.result()
                            if self.checked(key, sha, result, bar):
                                for prepared in result:
                                    target = prepared.placement.target_size
                                    buffered.setdefault(target, []).append(prepared)
                        else:
                            idle.append(encodes.pop(future))
                            self.encoded(future.result(), bar)
            finally:
                for future in preps | set(encodes):
                    future.cancel()
                for future in encodes:  # what finished still gets written
                    if future.done() and not future.cancelled() and future.exception() is None:
                        self.rows += [r for r in future.result() if isinstance(r, dict)]
                self.flush(force=True)

    def stale(self) -> list[StoredRow]:
        """Rows whose source changed since (or that are duplicates): retired after the run."""
        stale = []
        for (key, _), rows in self.stored.items():
            sha = self.current.get(key)
            if sha is None:
                continue  # not in this run's source (or unreadable): left as it is
            keep = next((r for r in rows if r.sha256 == sha), None)
            stale += [r for r in rows if r is not keep]
        return stale


def encode_dataset(
    src: str | os.PathLike[str] | Any,
    out: str | os.PathLike[str],
    *,
    model: ModelLike = DEFAULT_MODEL,
    endpoint: Endpoints = None,
    token: Token = None,
    provider: Provider = "auto",
    resolution: int = 1024,
    step: int = 64,
    min_side: int | None = None,
    max_side: int | None = None,
    mode: Literal["crop", "resize"] = "crop",
    no_upscale: bool = False,
    flip: bool = False,
    sample: bool = False,
    seed: int = 0,
    dtype: LatentDType = "float32",
    batch_size: int = 8,
    shard_size: int = 1024,
    threads: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_column: str | None = None,
    key_column: str | None = None,
    progress: bool | None = None,
    vae: VAE | None = None,
    ray: bool | str = False,
    ray_actors: int | None = None,
) -> DatasetReport:
    """Encodes every image of `src` (a folder, a list file, Parquet or WebDataset shards, a
    Hugging Face dataset: `datasets.Dataset`, `hf:NAME[:SPLIT]`, a `save_to_disk` folder) into a
    cache of latents at `out`: Parquet shards of self-describing rows and JSON manifests (see
    `vaelink.dataset`). Run it again to finish a run that was stopped (even by `kill -9`): only
    what is missing is encoded, changed files are re-encoded and their stale rows retired.
    Settings that change latents write to another version folder. Bad images are skipped and
    listed (`DatasetReport.skipped`, and the manifest). `endpoint`: as `vaelink.VAE`'s; with a
    list, one encoding thread per endpoint, each falling back along the whole list.
    `progress`: None draws a bar on a terminal only.

    `ray`: encode on a Ray cluster with Ray Data (`pip install 'vaelink[ray]'`): True joins the
    cluster of `RAY_ADDRESS` (or one already initialised), else starts a local one; a string is
    the cluster's address. The driver reads and hashes the source and writes the shards (the same
    format, manifest and resumability); actors, each loading the model once, decode, resize and
    encode: one per GPU, or `ray_actors` (default one per node) sharing the CPUs less one per
    node for Ray Data's own tasks. See `vaelink.dataset.distributed`."""
    started = time.monotonic()
    if ray is not False and vae is not None:
        raise ValueError("vae= cannot travel to Ray actors: pass model= (and endpoint=)")
    spec = BucketSpec(resolution, step, min_side, max_side, mode, no_upscale, flip)
    vaes = (
        [vae]
        if vae is not None
        else [VAE(model, e, token=token, provider=provider) for e in _rotations(endpoint)]
    )
    card = vaes[0].card
    spec.check(card.spatial_factor)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be at least 1")
    sample = sample and card.has_posterior  # tiny autoencoders are deterministic
    config = {
        "format": FORMAT,
        "model": card.name,
        "model_id": _model_id(vaes[0]),
        "scaling_factor": card.scaling_factor,
        "shift_factor": card.shift_factor,
        "latent_channels": card.latent_channels,
        "preprocess": spec.parameters(),
        "kind": "sample" if sample else "mean",
        "seed": seed if sample else None,
        "dtype": dtype,
    }
    version = "v-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    report = DatasetReport(Path(out), version)
    source = open_source(src, image_column, key_column)
    store = ShardStore(Path(out), version, config)
    try:
        run = _Run(
            vaes,
            store,
            spec,
            config,
            sample=sample,
            seed=seed,
            dtype=dtype,
            batch_size=batch_size,
            shard_size=shard_size,
            threads=threads or min(8, os.cpu_count() or 1),
            max_pixels=max_pixels,
            provider=provider,
            report=report,
        )
        if not ray and vae is None and all(v.targets == ("local",) for v in vaes):
            vaes[0].engine  # noqa: B018 - load the model before the bar starts
        from tqdm import tqdm

        total = None if source.total is None else source.total * run.variants
        with tqdm(
            total=total,
            unit="img",
            desc=f"{card.name} {version}",
            disable=None if progress is None else not progress,
            dynamic_ncols=True,
            file=sys.stderr,
        ) as bar:
            if ray is False:
                run.run(iter(source.items), bar)
            else:
                from .distributed import run_on_ray

                run_on_ray(
                    run,
                    iter(source.items),
                    bar,
                    model=model,
                    endpoint=endpoint,
                    token=token,
                    provider=provider,
                    address=ray,
                    actors=ray_actors,
                )
        report.retired = store.retire(run.stale())
        report.seconds = time.monotonic() - started
        _finish_manifest(store, config, source.kind, report)
    finally:
        store.close()
        if vae is None:  # ours: let go of the sessions and connections
            for made in vaes:
                made.close()
    return report


def _finish_manifest(
    store: ShardStore, config: dict[str, Any], kind: str, report: DatasetReport
) -> None:
    import pyarrow.parquet as pq

    shards = [
        {"file": f"data/{s.name}", "rows": pq.read_metadata(s).num_rows} for s in store.shards()
    ]
    report.rows = sum(int(s["rows"]) for s in shards)
    runs = store.read_manifest().get("runs", [])
    runs.append(
        {
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": kind,
            "seconds": round(report.seconds, 3),
            "encoded": report.encoded,
            "cached": report.cached,
            "skipped": len(report.skipped),
            "retired": report.retired,
        }
    )
    store.write_manifest(
        {
            "format": FORMAT,
            "version": store.version,
            "config": config,
            "rows": report.rows,
            "shards": shards,
            "skipped": report.skipped,
            "nonfinite": report.nonfinite,
            "runs": runs,
        }
    )
