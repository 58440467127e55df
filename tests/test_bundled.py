"""The bundled model, `vaelink-tiny`: shipped inside the package, found offline, used by the demo;
also where real reconstruction quality matters (tiling seams, codec round trips)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vaelink
from vaelink.demo import SAMPLE_PHOTO, psnr
from vaelink.engine import DEFAULT_MODEL, Engine
from vaelink.exports import find_export, read_manifest


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(DEFAULT_MODEL, provider="cpu")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return vaelink.decode_image(SAMPLE_PHOTO)


def test_bundled_model_ships_inside_the_package_and_verifies() -> None:
    folder = find_export(DEFAULT_MODEL)
    assert folder == Path(vaelink.__file__).parent / "models" / DEFAULT_MODEL
    manifest = read_manifest(folder)  # checks every file's SHA-256
    assert set(manifest.variants) == {"float32", "float16"}
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 10 * 2**20


def test_reconstruction_quality(engine: Engine, photo: np.ndarray) -> None:
    restored = engine.decode(engine.encode(photo))[0]
    assert restored.shape == photo.shape
    assert psnr(photo, restored) > 25.0  # measured 27.9 dB (a training photo)


def test_reconstruction_quality_on_a_held_out_photo(engine: Engine) -> None:
    from skimage import data

    cat = np.ascontiguousarray(data.chelsea()[22:278, 97:353])  # 256 x 256, never trained on
    restored = engine.decode(engine.encode(cat))[0]
    assert psnr(cat, restored) > 27.0  # measured 28.4 dB (27.5 dB by the previous, 32-wide model)


def test_tiled_decode_stays_within_the_stated_bound(engine: Engine, photo: np.ndarray) -> None:
    """The bound the README states for tiling: with 256-pixel tiles, a tiled decode of a real photo
    stays within 45 dB PSNR of the untiled decode and no pixel moves by more than 16 levels
    (measured on a 1024 x 1024 photo by models/evaluate_bundled.py: 58.2 dB, 5 levels)."""
    latents = engine.encode(photo)
    untiled = engine.decode(latents, tile=False)[0]
    tiled = Engine(DEFAULT_MODEL, provider="cpu", tile_size=256).decode(latents, tile=True)[0]
    assert psnr(untiled, tiled) > 45.0
    assert np.abs(untiled.astype(int) - tiled.astype(int)).max() <= 16


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_codec_round_trip_through_the_model(engine: Engine, photo: np.ndarray, fmt: str) -> None:
    """An image encoded in each format, decoded back, keeps its reconstruction quality."""
    data = vaelink.encode_image(photo, fmt, quality=95)
    restored = engine.decode(engine.encode(data))[0]
    assert psnr(photo, restored) > 24.0


def test_demo_runs_offline_without_torch(tmp_path: Path) -> None:
    """`vaelink demo` on the bundled model, in a fresh interpreter: no torch imported, files written."""
    script = (
        "import sys; from vaelink.cli import main; rc = main(['demo', '-o', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VAELINK_HOME": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "reconstruction PSNR" in result.stdout
    side = vaelink.decode_image(tmp_path / "side_by_side.png")
    assert side.shape[0] == 512 and side.shape[1] > 2 * 512
    tensors, metadata = vaelink.load_latents(tmp_path / "latents.safetensors")
    assert tensors["latents"].shape == (1, 16, 64, 64)
    assert metadata["model"] == DEFAULT_MODEL
