"""Where exported models live, their manifests, and the one resolver from a model name or folder to
its card and export (`resolve_model`).

An export is a folder holding ONNX graphs (`encoder-<variant>.onnx`, `decoder-<variant>.onnx`) and a
`manifest.json` that records the model's constants, where it came from, the exporter's versions and a
SHA-256 of every file - checked when the export is loaded.

Exports live under the cache directory: `$VAELINK_HOME`, else `$XDG_CACHE_HOME/vaelink`, else
`~/.cache/vaelink`."""

from __future__ import annotations

import hashlib
import json
import os
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
    "export_dir",
    "find_export",
    "read_manifest",
    "resolve_model",
    "sha256_file",
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
    return cache_dir() / "exports" / name


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
        )


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
        try:
            entries = (
                [
                    (folder / info["file"], info["bytes"], info["sha256"])
                    for parts in manifest.variants.values()
                    for info in parts.values()
                ]
                + [
                    (folder / step["file"], step["bytes"], step["sha256"])
                    for steps in manifest.segments.values()
                    for step in steps
                    if "file" in step
                ]
                + [
                    (folder / info["file"], info["bytes"], info["sha256"])
                    for info in manifest.fused.values()
                ]
            )
        except (AttributeError, KeyError, TypeError) as e:
            raise CorruptExportError(
                f"{folder / MANIFEST} lists its files wrongly: {e!r}"
            ) from None
        for path, size, digest in entries:
            _verify_file(path, size, digest)
    return manifest


def _verify_file(path: Path, size: int, digest: str) -> None:
    if not path.is_file():
        raise CorruptExportError(f"{path} is missing; export the model again")
    if path.stat().st_size != size or sha256_file(path) != digest:
        raise CorruptExportError(
            f"{path} does not match its manifest (changed or truncated); export the model again"
        )


def _find_folder(name: str) -> Path | None:
    for folder in (BUNDLED_DIR / name, export_dir(name)):
        if (folder / MANIFEST).is_file():
            return folder
    return None


def _not_exported(card: ModelCard) -> ModelNotExportedError:
    return ModelNotExportedError(
        f"model {card.name!r} is not exported on this machine; run `vaelink export {card.name}` "
        f"(needs `pip install 'vaelink[export]'` and access to {card.repo or 'its weights'})"
    )


def find_export(name: str) -> Path:
    """The folder of `name`'s export: the bundled model, or one under the cache directory."""
    card = get_card(name)  # an unknown name gets the list of known ones
    folder = _find_folder(name)
    if folder is None:
        raise _not_exported(card)
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
"""A card name (`vaelink models`), an export folder, or a resolved `Model`."""


def resolve_model(model: ModelLike) -> Model:
    """The one meaning of a model argument: an existing folder is an export (its card from its
    manifest); anything else is a card name (its export bundled or in the cache, if any)."""
    if isinstance(model, Model):
        return model
    folder = Path(model)
    if folder.is_dir():
        return Model(read_manifest(folder, verify=False).card, folder)
    name = os.fspath(model)
    return Model(get_card(name), _find_folder(name))
