"""Where exported models live, and their manifests.

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

from .errors import VaelinkError
from .registry import ModelCard

__all__ = [
    "MANIFEST",
    "CorruptExportError",
    "Manifest",
    "ModelNotExportedError",
    "cache_dir",
    "export_dir",
    "find_export",
    "read_manifest",
    "sha256_file",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ModelNotExportedError(VaelinkError, FileNotFoundError):
    """The model has a card but no export on this machine."""


class CorruptExportError(VaelinkError, ValueError):
    """An export whose files are missing, changed or not what the manifest says."""


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
            entries = [
                (folder / info["file"], info["bytes"], info["sha256"])
                for parts in manifest.variants.values()
                for info in parts.values()
            ]
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


def find_export(name: str) -> Path:
    """The folder of `name`'s export: the bundled model, or one under the cache directory."""
    from .registry import get_card

    candidates = [Path(__file__).parent / "models" / name, export_dir(name)]
    for folder in candidates:
        if (folder / MANIFEST).is_file():
            return folder
    card = get_card(name)  # an unknown name gets the list of known ones
    raise ModelNotExportedError(
        f"model {card.name!r} is not exported on this machine; run `vaelink export {card.name}` "
        f"(needs `pip install 'vaelink[export]'` and access to {card.repo or 'its weights'})"
    )
