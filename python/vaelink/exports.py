"""Where exported models live, their manifests, and the one resolver from a model name or folder to
its card and export (`resolve_model`).

An export is a folder holding ONNX graphs (`encoder-<variant>.onnx`, `decoder-<variant>.onnx`) and a
`manifest.json` that records the model's constants, where it came from, the exporter's versions and a
SHA-256 of every file - checked when the export is loaded.

Exports live under the cache directory: `$VAELINK_HOME`, else `$XDG_CACHE_HOME/vaelink`, else
`~/.cache/vaelink`, in `exports/<name>` - made by `vaelink export`, `vaelink import` or (a link into
the Hugging Face cache) `vaelink pull`. An export's own card (its manifest's) is the model's card:
its name works like a built-in card's even when no card has it (a custom VAE)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cards import ModelCard, get_card
from .errors import CorruptExportError, ModelNotExportedError, VaelinkError

__all__ = [
    "MANIFEST",
    "Manifest",
    "Model",
    "ModelLike",
    "cache_dir",
    "check_name",
    "export_dir",
    "file_entry",
    "find_export",
    "list_exports",
    "manifest_files",
    "read_manifest",
    "remove_path",
    "replace_path",
    "resolve_model",
    "sha256_file",
    "staged",
    "versions",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
BUNDLED_DIR = Path(__file__).parent / "models"


def cache_dir() -> Path:
    if home := os.environ.get("VAELINK_HOME"):
        return Path(home)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vaelink"


def export_dir(name: str) -> Path:
    return cache_dir() / "exports" / check_name(name)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(name: str) -> str:
    """A model name that can be a folder of the cache: letters, digits, `.`, `_`, `-`."""
    if not _NAME.fullmatch(name):
        raise VaelinkError(
            f"{name!r} cannot name a model: use letters, digits, '.', '_' and '-' (up to 100, "
            "starting with a letter or digit)"
        )
    return name


@dataclass
class Manifest:
    card: ModelCard
    variants: dict[str, dict[str, dict[str, Any]]]
    """variant ("float32", "float16", "float16-cuda") -> part ("encoder"/"decoder") -> file info."""
    source: dict[str, Any] = field(default_factory=dict)
    exporter: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    segments: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """part -> the float32 steps of exact tiling (`vaelink.exact`); empty for models without
    normalisation layers and for exports older than exact tiling."""
    fused: dict[str, dict[str, Any]] = field(default_factory=dict)
    """part -> fast tiling's whole-part graph with the norms' statistics as inputs
    (`vaelink.export_segments`); empty where `segments` is, and for exports older than it."""
    data_files: list[dict[str, Any]] = field(default_factory=list)
    """Other files the graphs read - ONNX external data of imported graphs - checked like them."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise CorruptExportError(f"a manifest is a JSON object, not {type(data).__name__}")
        if data.get("format_version") != FORMAT_VERSION:
            raise CorruptExportError(f"unsupported manifest version {data.get('format_version')}")
        return cls(
            card=ModelCard.from_dict(data["card"]),
            variants=data["variants"],
            source=data.get("source", {}),
            exporter=data.get("exporter", {}),
            segments=data.get("segments", {}),
            fused=data.get("fused", {}),
            data_files=data.get("data_files", []),
        )


def versions(*packages: str) -> dict[str, str]:
    """The installed versions of vaelink and `packages` (those installed), for a manifest."""
    found = {}
    for package in ("vaelink", *packages):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path, *, verify: bool = True) -> Manifest:
    """Reads a manifest; with `verify`, checks each listed file's size and SHA-256."""
    try:
        manifest = Manifest.from_json((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise CorruptExportError(f"{folder} has no {MANIFEST}") from None
    except CorruptExportError:
        raise
    except (KeyError, TypeError, ValueError, VaelinkError) as e:  # VaelinkError: a bad card
        raise CorruptExportError(f"{folder / MANIFEST} is not a valid manifest: {e}") from None
    if verify:
        for entry in _entries(manifest, folder):
            _verify_file(folder / entry["file"], entry["bytes"], entry["sha256"])
    return manifest


def _entries(manifest: Manifest, folder: Path) -> list[dict[str, Any]]:
    """Every file entry (`file`, `bytes`, `sha256`) of a manifest."""
    try:
        entries = [
            *(info for parts in manifest.variants.values() for info in parts.values()),
            *(step for steps in manifest.segments.values() for step in steps if "file" in step),
            *manifest.fused.values(),
            *manifest.data_files,
        ]
        for entry in entries:
            for key, kind in (("file", str), ("bytes", int), ("sha256", str)):
                if not isinstance(entry[key], kind):
                    raise TypeError(f"{key} of {entry!r} is not a {kind.__name__}")
            if Path(entry["file"]).is_absolute() or ".." in Path(entry["file"]).parts:
                raise ValueError(f"{entry['file']!r} is outside the export")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CorruptExportError(f"{folder / MANIFEST} lists its files wrongly: {e!r}") from None
    return entries


def manifest_files(manifest: Manifest) -> list[str]:
    """The paths, relative to the export's folder, of every file a manifest lists."""
    return [entry["file"] for entry in _entries(manifest, Path("."))]


def file_entry(folder: Path, file: str) -> dict[str, Any]:
    """A manifest's entry for `folder / file`: its name, size and SHA-256."""
    path = folder / file
    return {"file": file, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


@contextlib.contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A fresh folder next to `output` to write an export into; when the block succeeds it replaces
    `output` (a folder, or a link as `vaelink pull` makes), else it is removed: an interrupted
    export never leaves a folder that looks complete."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache's exports from other users
    try:
        yield work
        replace_path(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def remove_path(path: Path) -> None:
    """Removes a folder, a file or a link (not what it points to), if there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def replace_path(new: Path, output: Path) -> None:
    """Puts `new` (a folder or a link) at `output`, removing what was there."""
    remove_path(output)
    new.rename(output)


def _verify_file(path: Path, size: int, digest: str) -> None:
    if not path.is_file():
        raise CorruptExportError(f"{path} is missing; export the model again")
    if path.stat().st_size != size or sha256_file(path) != digest:
        raise CorruptExportError(
            f"{path} does not match its manifest (changed or truncated); export the model again"
        )


def _find_folder(name: str) -> Path | None:
    if not _NAME.fullmatch(name):
        return None
    for folder in (BUNDLED_DIR / name, export_dir(name)):
        if (folder / MANIFEST).is_file():
            return folder
    return None


def _card_of(name: str, folder: Path) -> ModelCard:
    """The card of the export `name` found in `folder`: its manifest's, under the name asked for
    (a pulled export may have been published under another)."""
    card = read_manifest(folder, verify=False).card
    return card if card.name == name else dataclasses.replace(card, name=name)


def list_exports() -> list[tuple[ModelCard, Path]]:
    """The exports in the cache directory (cards and folders), by name; unreadable ones are left
    out."""
    root = cache_dir() / "exports"
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if _NAME.fullmatch(folder.name) and (folder / MANIFEST).is_file():
            with contextlib.suppress(CorruptExportError):
                found.append((_card_of(folder.name, folder), folder))
    return found


def _not_exported(card: ModelCard) -> ModelNotExportedError:
    return ModelNotExportedError(
        f"model {card.name!r} is not exported on this machine; run `vaelink export {card.name}` "
        f"(needs `pip install 'vaelink[export]'` and access to {card.repo or 'its weights'})"
    )


def find_export(name: str) -> Path:
    """The folder of `name`'s export: the bundled model, or one under the cache directory."""
    folder = _find_folder(name)
    if folder is None:
        raise _not_exported(get_card(name))  # an unknown name gets the list of known ones
    return folder


@dataclass(frozen=True)
class Model:
    """A model as vaelink knows it: its card and, when it is exported on this machine, the
    export's folder (a remote endpoint needs only the card)."""

    card: ModelCard
    folder: Path | None

    def export_folder(self) -> Path:
        """The export's folder; `ModelNotExportedError` (naming the command) when there is none."""
        if self.folder is None:
            raise _not_exported(self.card)
        return self.folder


ModelLike = str | os.PathLike[str] | Model
"""A model name (a card, or an export in the cache), an export folder - vaelink's, or an ONNX
Runtime / optimum one (`vae_encoder/`, `vae_decoder/`) - or a resolved `Model`."""


def resolve_model(model: ModelLike) -> Model:
    """The one meaning of a model argument: an existing folder is an export (its card from its
    manifest; an optimum layout is imported first, `vaelink.imports`); anything else is a name:
    an export bundled or in the cache (its manifest's card), else a card not exported here."""
    if isinstance(model, Model):
        return model
    folder = Path(model)
    if folder.is_dir():
        if not (folder / MANIFEST).is_file():
            from .imports import find_onnx_layout, imported

            if find_onnx_layout(folder) is not None:
                folder = imported(folder)
        return Model(read_manifest(folder, verify=False).card, folder)
    name = os.fspath(model)
    found = _find_folder(name)
    if found is not None:
        return Model(_card_of(name, found), found)
    return Model(get_card(name), None)
