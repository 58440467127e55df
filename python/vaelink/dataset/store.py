"""The cache on disk: Parquet shards of self-describing rows, written atomically, and JSON
manifests; `LatentDataset` reads them back.

    OUT/manifest.json                  the versions and which one is current
    OUT/<version>/manifest.json        that version's settings, shards, skipped items, runs
    OUT/<version>/data/shard-*.parquet the rows (`pyarrow.dataset.dataset(OUT/<version>/data)`)

A version is a hash of every setting that changes latents (model, preprocessing, mean or
sample, dtype, format): other settings write elsewhere instead of mixing. The shards are the
truth: a run scans them to know what is done, so a run killed at any point loses at most the
rows not yet in a renamed shard; temporary files start with a dot, which every Parquet reader
skips."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..dtypes import numpy_dtype
from ..files import atomic_write_bytes, fsync_dir, temporary_sibling

__all__ = ["FORMAT", "LatentDataset", "ShardStore", "schema"]

FORMAT = "vaelink-dataset/1"
MANIFEST = "manifest.json"
ROW_GROUP = 32


def schema() -> Any:
    import pyarrow as pa

    sizes = pa.list_(pa.int32())
    return pa.schema(
        [
            ("format", pa.string()),
            ("version", pa.string()),
            ("key", pa.string()),
            ("sha256", pa.string()),
            ("flipped", pa.bool_()),
            ("latents", pa.binary()),
            ("shape", sizes),
            ("dtype", pa.string()),
            ("kind", pa.string()),
            ("seed", pa.int64()),
            ("model", pa.string()),
            ("scaling_factor", pa.float64()),
            ("shift_factor", pa.float64()),
            ("original_size", sizes),
            ("resized_size", sizes),
            ("crop_box", sizes),
            ("target_size", sizes),
            ("preprocess", pa.string()),
        ]
    )


def _write_table_atomic(path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    tmp = temporary_sibling(path)
    pq.write_table(table, tmp, row_group_size=ROW_GROUP, compression="zstd")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class StoredRow:
    shard: str
    key: str
    sha256: str
    flipped: bool


class ShardStore:
    """One version's folder: scans what is there, writes new shards, retires stale rows. Holds an
    exclusive lock on the folder for as long as it is open (one writer at a time)."""

    def __init__(self, root: Path, version: str, config: dict[str, Any]) -> None:
        self.root = root
        self.version = version
        self.folder = root / version
        self.data = self.folder / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.folder / ".lock", "w")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"{self.folder} is being written by another run") from None
        for leftover in self.data.glob(".*.tmp"):  # from a run killed while writing
            leftover.unlink(missing_ok=True)
        self._run = uuid.uuid4().hex[:8]
        self._next = 0
        self._mutex = threading.Lock()
        self._register(config)

    def close(self) -> None:
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def _register(self, config: dict[str, Any]) -> None:
        path = self.root / MANIFEST
        top: dict[str, Any] = {"format": FORMAT, "current": self.version, "versions": {}}
        with contextlib.suppress(OSError, ValueError):
            top["versions"] = json.loads(path.read_text())["versions"]
        top["versions"][self.version] = config
        atomic_write_bytes(path, (json.dumps(top, indent=2) + "\n").encode())

    def shards(self) -> list[Path]:
        return sorted(self.data.glob("shard-*.parquet"))

    def scan(self) -> list[StoredRow]:
        """Every row's identity, from the shards themselves."""
        import pyarrow.parquet as pq

        rows = []
        for shard in self.shards():
            table = pq.read_table(shard, columns=["key", "sha256", "flipped"])
            for key, sha, flip in zip(
                *(table.column(i).to_pylist() for i in range(3)), strict=True
            ):
                rows.append(StoredRow(shard.name, key, sha, flip))
        return rows

    def write(self, rows: list[dict[str, Any]]) -> Path:
        """A new shard holding `rows`, atomically."""
        import pyarrow as pa

        with self._mutex:
            path = self.data / f"shard-{self._run}-{self._next:05d}.parquet"
            self._next += 1
        _write_table_atomic(path, pa.Table.from_pylist(rows, schema=schema()))
        return path

    def retire(self, stale: Iterable[StoredRow]) -> int:
        """Rewrites the shards holding `stale` rows without them (removing emptied shards)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        by_shard: dict[str, set[tuple[str, str, bool]]] = {}
        for row in stale:
            by_shard.setdefault(row.shard, set()).add((row.key, row.sha256, row.flipped))
        retired = 0
        for name, drop in by_shard.items():
            path = self.data / name
            table = pq.read_table(path)
            ids = zip(
                *(table.column(c).to_pylist() for c in ("key", "sha256", "flipped")), strict=True
            )
            keep = pa.array([i not in drop for i in ids], pa.bool_())
            kept = table.filter(keep)
            retired += table.num_rows - kept.num_rows
            if kept.num_rows == 0:
                path.unlink()
                fsync_dir(self.data)
            elif kept.num_rows < table.num_rows:
                _write_table_atomic(path, kept.combine_chunks())
        return retired

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_bytes(self.folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())

    def read_manifest(self) -> dict[str, Any]:
        try:
            manifest: dict[str, Any] = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}
        return manifest


def current_version(out: Path) -> str:
    """The version the last run wrote, from `OUT/manifest.json`."""
    try:
        return str(json.loads((out / MANIFEST).read_text())["current"])
    except (OSError, ValueError, KeyError) as error:
        raise FileNotFoundError(f"{out} holds no vaelink dataset ({error})") from None


class LatentDataset:
    """A map-style dataset over a cache written by `encode_dataset` (a torch `Dataset` by duck
    typing: `len()` and `[i]`). Item `i` is a dict: `latents` (`(C, h, w)`, numpy, or a torch
    tensor with `output="torch"`), `key`, `sha256`, `flipped`, and the sizes SDXL's conditioning
    takes: `original_size`, `target_size` (`(height, width)`), `crop_top_left` (`(top, left)`),
    plus `crop_box`. Reads one row group at a time, so memory stays small. `version`: default the
    current one (the last run's settings)."""

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        version: str | None = None,
        output: Literal["numpy", "torch"] = "numpy",
    ) -> None:
        import pyarrow.parquet as pq

        self.root = Path(out)
        self.version = version or current_version(self.root)
        self.output = output
        self.files = sorted((self.root / self.version / "data").glob("shard-*.parquet"))
        self._index: list[tuple[int, int, int]] = []  # (file, row group, row)
        self._keys: list[str] = []
        self._targets: list[tuple[int, int]] = []
        for f, path in enumerate(self.files):
            parquet = pq.ParquetFile(path)
            for g in range(parquet.num_row_groups):
                meta = parquet.read_row_group(g, columns=["key", "target_size"])
                self._keys += meta.column("key").to_pylist()
                self._targets += [tuple(t) for t in meta.column("target_size").to_pylist()]
                self._index += [(f, g, r) for r in range(meta.num_rows)]
        self._cached: tuple[tuple[int, int], list[dict[str, Any]]] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        return list(self._keys)

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """The indices of each target size `(height, width)`: batch within one for training."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, target in enumerate(self._targets):
            out.setdefault(target, []).append(i)
        return out

    def _group(self, f: int, g: int) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        with self._lock:
            if self._cached is None or self._cached[0] != (f, g):
                rows = pq.ParquetFile(self.files[f]).read_row_group(g).to_pylist()
                self._cached = ((f, g), rows)
            return self._cached[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        f, g, r = self._index[index]
        row = self._group(f, g)[r]
        latents = np.frombuffer(row["latents"], numpy_dtype(row["dtype"])).reshape(row["shape"])
        item = {k: row[k] for k in ("key", "sha256", "flipped", "kind", "model")}
        for name in ("original_size", "target_size", "resized_size", "crop_box"):
            item[name] = tuple(row[name])
        left, top = row["crop_box"][:2]
        item["crop_top_left"] = (top, left)
        if self.output == "torch":
            import torch

            if row["dtype"] == "bfloat16":  # numpy has no bfloat16 of its own: cross as bits
                bits = torch.from_numpy(latents.view(np.uint16).copy())
                item["latents"] = bits.view(torch.bfloat16)
            else:
                item["latents"] = torch.from_numpy(latents.copy())
        else:
            item["latents"] = latents
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]
