"""Where images come from: a folder tree, a list file, Parquet shards holding image bytes, and
WebDataset tar shards, Hugging Face `datasets` (optional, imported when used). Each source yields `SourceItem`s: a stable key and a way to read the bytes
(files are read in the worker threads; shard formats hold the bytes already)."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_SUFFIXES", "Source", "SourceItem", "open_source"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
KEY_COLUMNS = ("key", "__key__", "file_name", "path", "id", "name")


@dataclass(frozen=True)
class SourceItem:
    key: str
    read: Callable[[], bytes]


@dataclass
class Source:
    """Items and, when known up front, how many there are."""

    kind: str
    items: Iterable[SourceItem]
    total: int | None


def _file_item(key: str, path: Path) -> SourceItem:
    return SourceItem(key, path.read_bytes)


def folder_source(root: Path) -> Source:
    """Every image under `root`, recursively, keyed by its path relative to `root` (posix)."""
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )
    items = [_file_item(p.relative_to(root).as_posix(), p) for p in paths]
    return Source("folder", items, len(items))


def list_source(list_file: Path) -> Source:
    """One path per line (blank lines and `#` comments ignored), relative to the list's folder
    unless absolute; keyed by the path as written."""
    items = []
    for line in list_file.read_text().splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            path = Path(entry) if os.path.isabs(entry) else list_file.parent / entry
            items.append(_file_item(entry, path))
    return Source("list", items, len(items))


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
    return [path]


def _image_column(schema: Any, wanted: str | None) -> str:
    import pyarrow as pa

    if wanted is not None:
        return wanted
    for field in schema:  # raw bytes, or Hugging Face's Image feature: struct<bytes, path>
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            return str(field.name)
        if pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0:
            return str(field.name)
    raise ValueError(f"no column of image bytes in {schema.names}; pass image_column=")


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, bytes):
        return b""  # an empty cell: skipped later as undecodable
    return value


def parquet_source(
    path: Path, image_column: str | None = None, key_column: str | None = None
) -> Source:
    """Rows of Parquet files (a file, or every `*.parquet` under a folder) holding encoded images
    in a binary column or a `{bytes, path}` struct (Hugging Face's Image feature). Keyed by
    `key_column` (default: the first of key, __key__, file_name, path, id, name present), else by
    `<file>/<row>`. Read a batch of rows at a time."""
    import pyarrow.parquet as pq

    files = _parquet_files(path)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)

    def items() -> Iterator[SourceItem]:
        for file in files:
            parquet = pq.ParquetFile(file)
            column = _image_column(parquet.schema_arrow, image_column)
            names = parquet.schema_arrow.names
            key = key_column or next((k for k in KEY_COLUMNS if k in names), None)
            columns = [column] if key is None else [column, key]
            stem = file.relative_to(path).as_posix() if path.is_dir() else file.name
            row = 0
            for batch in parquet.iter_batches(batch_size=64, columns=columns):
                images = batch.column(column).to_pylist()
                keys = batch.column(key).to_pylist() if key else [None] * len(images)
                for value, name in zip(images, keys, strict=True):
                    data = _image_bytes(value)
                    label = f"{stem}/{row}" if name is None else str(name)
                    yield SourceItem(label, lambda data=data: data)  # type: ignore[misc]
                    row += 1

    return Source("parquet", items(), total)


def webdataset_source(path: Path) -> Source:
    """WebDataset tar shards (a `.tar` file or every `.tar` under a folder), read as a stream: each
    image member is an item keyed `<shard>/<member name>`."""
    shards = sorted(path.rglob("*.tar")) if path.is_dir() else [path]

    def items() -> Iterator[SourceItem]:
        for shard in shards:
            stem = shard.relative_to(path).as_posix() if path.is_dir() else shard.name
            with tarfile.open(shard, "r|*") as tar:
                for member in tar:
                    if (
                        not member.isfile()
                        or Path(member.name).suffix.lower() not in IMAGE_SUFFIXES
                    ):
                        continue
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    yield SourceItem(f"{stem}/{member.name}", lambda data=data: data)  # type: ignore[misc]

    return Source("webdataset", items(), None)


def hf_source(
    dataset: Any, image_column: str | None = None, key_column: str | None = None
) -> Source:
    """A Hugging Face `datasets.Dataset` (or the `train` split, else the first, of a
    `DatasetDict`): its Image column read undecoded (`{bytes, path}`), keyed by `key_column` (or
    the first of key, __key__, file_name, path, id, name present), else by row number."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    features = dataset.features
    column = image_column or next(
        (name for name, f in features.items() if isinstance(f, datasets.Image)), None
    )
    if column is None:
        raise ValueError(f"no Image column in {list(features)}; pass image_column=")
    if isinstance(features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    key = key_column or next((k for k in KEY_COLUMNS if k in features and k != column), None)

    def items() -> Iterator[SourceItem]:
        columns = [column] if key is None else [column, key]
        for i, row in enumerate(dataset.select_columns(columns)):
            value = row[column]
            data = _image_bytes(value)
            if not data and isinstance(value, dict) and value.get("path"):
                path = Path(value["path"])
                yield SourceItem(str(row[key]) if key else str(i), path.read_bytes)
                continue
            yield SourceItem(str(row[key]) if key else str(i), lambda data=data: data)  # type: ignore[misc]

    return Source("datasets", items(), len(dataset))


def _load_hf(src: str) -> Any:
    """`hf:NAME[:SPLIT]` (loaded by `datasets.load_dataset`: local, or cached / downloaded as
    `datasets` does), or a folder written by `save_to_disk`."""
    import datasets

    if src.startswith("hf:"):
        name, _, split = src[3:].partition(":")
        return datasets.load_dataset(name, split=split or None)
    return datasets.load_from_disk(src)


def open_source(
    src: str | os.PathLike[str] | Any,
    image_column: str | None = None,
    key_column: str | None = None,
) -> Source:
    """A folder, a list file (`.txt` / `.lst`), Parquet (`.parquet`, or a folder of them holding no
    images), WebDataset (`.tar`, or a folder of them), or a Hugging Face dataset: a
    `datasets.Dataset`, `hf:NAME[:SPLIT]`, or a folder from `save_to_disk` (needs `datasets`)."""
    if not isinstance(src, str | os.PathLike):
        return hf_source(src, image_column, key_column)
    if isinstance(src, str) and src.startswith("hf:"):
        return hf_source(_load_hf(src), image_column, key_column)
    path = Path(src)
    if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
        return hf_source(_load_hf(str(path)), image_column, key_column)
    if not path.exists():
        raise FileNotFoundError(f"no such source: {path}")
    if path.is_dir():
        source = folder_source(path)
        if source.total:
            return source
        if any(path.rglob("*.parquet")):
            return parquet_source(path, image_column, key_column)
        if any(path.rglob("*.tar")):
            return webdataset_source(path)
        return source
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return parquet_source(path, image_column, key_column)
    if suffix == ".tar":
        return webdataset_source(path)
    if suffix in IMAGE_SUFFIXES:
        return Source("list", [_file_item(path.name, path)], 1)
    return list_source(path)
