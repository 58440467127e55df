"""`encode_dataset(..., ray=True)` / `vaelink dataset --ray`: the same job on a Ray cluster.

The driver does what the local run does around the model: it lists the source, reads and hashes
each item, and keeps only what the cache lacks (`_Run.check`, the local run's own logic); the
rest goes through Ray Data (`from_items` -> `map_batches(EncodeActor)`): a pool of actors, each
loading the model once, decoding, resizing (`prepare_variants`) and encoding (`Encoder`) batches
of one bucket. The rows stream back to the driver (`iter_batches`), which writes them with the
local run's shard writer: the same shards, manifest and resumability (a run stopped half-way
keeps what reached a shard, and the next one, Ray or not, encodes only the rest).

Resources: one actor per GPU (`num_gpus=1`) when the cluster has GPUs; otherwise one actor per
node (or `actors`) sharing the CPUs less one per node: an actor pool that takes every CPU starves
Ray Data's own tasks and hangs the pipeline. `ray` is imported only here, only when used
(`pip install 'vaelink[ray]'`)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..api import VAE, Endpoints, Token
from ..engine import Provider
from ..exports import ModelLike
from .buckets import BucketSpec
from .runner import Encoder, LatentDType, Prepared, prepare_variants
from .sources import SourceItem
from .store import schema

if TYPE_CHECKING:
    from .runner import _Run

__all__ = ["ActorSpec", "EncodeActor", "run_on_ray"]


@dataclass(frozen=True)
class ActorSpec:
    """What an actor needs to build its model and encoder (picklable: names, not sessions)."""

    model: ModelLike
    endpoint: Endpoints
    token: Token
    provider: Provider
    version: str
    spec: BucketSpec
    sample: bool
    seed: int
    dtype: LatentDType
    batch_size: int
    max_pixels: int
    threads: int


def _out_schema() -> Any:
    """The rows' schema, plus why an item (or one variant) was skipped and whether its latents
    were retried in float32."""
    import pyarrow as pa

    return schema().append(pa.field("skip", pa.string())).append(pa.field("nonfinite", pa.string()))


class EncodeActor:
    """A Ray Data callable class: `{key, sha256, data, flips}` batches (Arrow) -> rows (Arrow).
    The model loads once, in `__init__`; decoding and resizing run in threads (GIL released)."""

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        self.vae = VAE(spec.model, spec.endpoint, token=spec.token, provider=spec.provider)
        if self.vae.targets == ("local",):
            self.vae.engine  # noqa: B018 - load the model now, not in the first batch
        self.encoder = Encoder(
            [self.vae],
            spec.version,
            spec.spec,
            sample=spec.sample,
            seed=spec.seed,
            dtype=spec.dtype,
            provider=spec.provider,
        )
        self.buckets = spec.spec.buckets()
        self.pool = ThreadPoolExecutor(spec.threads, thread_name_prefix="vaelink-prepare")

    def _prepare(self, item: tuple[str, str, bytes, list[bool]]) -> list[Prepared] | str:
        key, sha, data, flips = item
        return prepare_variants(
            key, sha, data, set(flips), self.spec.spec, self.buckets, self.spec.max_pixels
        )

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        columns = [batch.column(c).to_pylist() for c in ("key", "sha256", "data", "flips")]
        items = list(zip(*columns, strict=True))
        out: list[dict[str, Any]] = []
        buckets: dict[tuple[int, int], list[Prepared]] = {}
        for (key, *_), result in zip(items, self.pool.map(self._prepare, items), strict=True):
            if isinstance(result, str):
                out.append({"key": key, "skip": result})
            else:
                for prepared in result:
                    buckets.setdefault(prepared.placement.target_size, []).append(prepared)
        size = self.spec.batch_size
        for group in buckets.values():
            for start in range(0, len(group), size):
                for row in self.encoder.encode(self.vae, group[start : start + size]):
                    if isinstance(row, tuple):
                        item, reason = row
                        out.append(
                            {"key": item.key, "flipped": item.placement.flipped, "skip": reason}
                        )
                    else:
                        out.append(row)
        retried = {(n["key"], n["flipped"]): n["action"] for n in self.encoder.nonfinite}
        self.encoder.nonfinite.clear()
        for row in out:
            if "latents" in row:
                row["nonfinite"] = retried.get((row["key"], str(row["flipped"])))
        return pa.Table.from_pylist(out, schema=_out_schema())


def _connect(address: bool | str) -> tuple[Any, bool]:
    """The `ray` module, connected; and whether this call started (so should stop) it."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            f"{error.name} is missing: pip install 'vaelink[ray]'", name=error.name
        ) from None
    if ray.is_initialized():
        return ray, False
    ray.init(address=address if isinstance(address, str) else None)
    return ray, True


def _resources(ray: Any, actors: int | None) -> tuple[int, dict[str, Any], int]:
    """(actors, each one's Ray resources, its preparing threads)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = sum(float(n.get("CPU", 0)) for n in nodes)
    gpus = int(sum(float(n.get("GPU", 0)) for n in nodes))
    free = max(cpus - len(nodes), 0.0)  # one CPU per node left to Ray Data's own tasks
    if gpus:
        count = actors or gpus
        return count, {"num_gpus": 1}, max(1, int(free // count))
    count = actors or len(nodes) or 1
    # Fractional shares where actors outnumber the free CPUs; one-CPU nodes: a share still
    # leaves room for the tasks.
    share = free / count if free > 0 else cpus / (count + 1)
    return count, {"num_cpus": share}, max(1, int(share))


def run_on_ray(
    run: _Run,
    items: Iterator[SourceItem],
    bar: Any,
    *,
    model: ModelLike,
    endpoint: Endpoints,
    token: Token,
    provider: Provider,
    address: bool | str,
    actors: int | None,
) -> None:
    """`_Run.run`, with the model's work on Ray actors; the driver writes the shards."""
    ray, started = _connect(address)
    try:
        pending: list[dict[str, Any]] = []
        flips: dict[str, int] = {}
        with ThreadPoolExecutor(run.threads, thread_name_prefix="vaelink-read") as pool:
            for key, sha, data, missing in pool.map(run.check, run.unique(items, bar)):
                if run.checked(key, sha, missing, bar):
                    assert not isinstance(missing, str)
                    pending.append(
                        {"key": key, "sha256": sha, "data": data, "flips": sorted(missing)}
                    )
                    flips[key] = len(missing)
        if not pending:
            return
        count, resources, threads = _resources(ray, actors)
        encoder = run.encoder
        spec = ActorSpec(
            model,
            endpoint,
            token,
            provider,
            run.store.version,
            run.spec,
            encoder.sample,
            encoder.seed,
            encoder.dtype,
            run.batch_size,
            run.max_pixels,
            threads,
        )
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = not bar.disable
        dataset = ray.data.from_items(pending).map_batches(
            EncodeActor,
            fn_constructor_args=(spec,),
            batch_size=4 * run.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=count),
            **resources,
        )
        del pending  # the object store holds the bytes now
        try:
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = []
                for row in table.to_pylist():
                    reason, retried = row.pop("skip"), row.pop("nonfinite")
                    if reason is not None:
                        n = 1 if row["flipped"] is not None else flips[row["key"]]
                        run.skip(row["key"], reason, n, bar)
                        continue
                    rows.append(row)
                    if retried:
                        key, flipped = row["key"], str(row["flipped"])
                        run.report.nonfinite.append(
                            {"key": key, "flipped": flipped, "action": retried}
                        )
                run.encoded(rows, bar)
        finally:
            run.flush(force=True)  # what came back is kept, whatever happened after
    finally:
        if started:
            ray.shutdown()
