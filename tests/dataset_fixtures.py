"""What the `vaelink.dataset` tests share: the photo tree (real photos under several names and
sizes, and bad files), the settings of every run, and readers of the rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from conftest import pil_encode, png_stub
from PIL import Image

import vaelink
from vaelink.dtypes import numpy_dtype

# Small buckets keep the bundled model fast on one core; the settings of every run.
SETTINGS: dict[str, Any] = {"resolution": 128, "step": 32, "flip": True, "progress": False}
BAD = {
    "bad/truncated.jpg": "DecodeError",
    "bad/notes.png": "DecodeError",
    "bad/huge.png": "ImageTooLargeError",
}


def photo_files(photos: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The scikit-image photos as JPEG, PNG and WebP, at several sizes, an exact copy under
    another name, and three bad files."""
    astronaut = pil_encode(photos["astronaut"], "JPEG", quality=92)
    half = Image.fromarray(photos["coffee"]).resize((300, 200), Image.Resampling.LANCZOS)
    tall = np.ascontiguousarray(photos["chelsea"][:, 100:300])  # 300 x 200: portrait
    return {
        "astronaut.jpg": astronaut,
        "copies/astronaut.jpg": astronaut,  # the same bytes under another key
        "cats/chelsea.png": pil_encode(photos["chelsea"], "PNG"),
        "cats/tall/chelsea-tall.webp": pil_encode(tall, "WEBP", lossless=True),
        "coffee-small.jpg": pil_encode(np.asarray(half), "JPEG", quality=90),
        "coffee-tiny.png": pil_encode(photos["coffee"][::8, ::8], "PNG"),  # 50 x 75: upscaled
        "bad/truncated.jpg": astronaut[: len(astronaut) // 3],
        "bad/notes.png": b"these are notes, not an image\n",
        "bad/huge.png": png_stub(100_000, 100_000),
    }


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def rows_by_id(folder: Path) -> dict[tuple[str, bool], dict[str, Any]]:
    """A version folder's rows by (key, flipped), read by pyarrow as they are."""
    table = pq.read_table(folder / "data")
    return {(r["key"], r["flipped"]): r for r in table.to_pylist()}


def latents_of(row: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(row["latents"], numpy_dtype(row["dtype"])).reshape(row["shape"])


def expected_pixels(data: bytes, row: dict[str, Any]) -> np.ndarray:
    """What the model should have seen: vaelink's decoding and Lanczos resize (each tested
    against Pillow in tests/test_image.py), then the crop and the flip, as the row says."""
    rgb = vaelink.decode_image(data)
    rh, rw = row["resized_size"]
    if rgb.shape[:2] != (rh, rw):
        rgb = vaelink.resize_image(rgb, rw, rh)
    left, top, right, bottom = row["crop_box"]
    pixels = rgb[top:bottom, left:right]
    return np.ascontiguousarray(pixels[:, ::-1] if row["flipped"] else pixels)


def assert_bad_listed(manifest: dict[str, Any]) -> None:
    """The bad files are in the manifest's skipped items, each with its error."""
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == set(BAD)
    for key, error in BAD.items():
        assert reasons[key].startswith(error), reasons[key]
