"""`vaelink demo`: the main job on a real photo, offline, with the bundled model.

Encodes a photo to latents and decodes it back with the local engine, reports the time of each step
and the reconstruction's PSNR, and writes a picture a person can look at - original | reconstruction |
latent channels - beside the latents themselves (safetensors)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import image, latents_file
from .cards import DEFAULT_MODEL
from .engine import Engine

SAMPLE_PHOTO = Path(__file__).parent / "data" / "astronaut.jpg"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def latent_grid(latents: np.ndarray, height: int) -> np.ndarray:
    """Latent channels `[C, h, w]` as a grid of gray tiles (each channel scaled to its own range),
    `height` pixels tall, as uint8 RGB."""
    c, h, w = latents.shape
    rows = int(np.ceil(np.sqrt(c)))
    cols = int(np.ceil(c / rows))
    lo = latents.min(axis=(1, 2), keepdims=True)
    span = np.maximum(latents.max(axis=(1, 2), keepdims=True) - lo, 1e-6)
    tiles = ((latents - lo) / span * 255).round().astype(np.uint8)
    grid = np.zeros((rows * h, cols * w), np.uint8)
    for i in range(c):
        r, k = divmod(i, cols)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = tiles[i]
    scale = max(1, height // grid.shape[0])
    grid = np.kron(grid, np.ones((scale, scale), np.uint8))  # nearest-neighbour: crisp cells
    padded = np.zeros((height, grid.shape[1]), np.uint8)
    padded[: grid.shape[0]] = grid[:height]
    return np.repeat(padded[:, :, None], 3, axis=2)


def run(photo: Path | None, output: Path, model: str = DEFAULT_MODEL) -> dict[str, float]:
    path = photo or SAMPLE_PHOTO
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    engine = Engine(model)
    print(f"model {engine.card.name} ({engine.provider}, {engine.dtype}) from {engine.folder}")
    pixels = image.fit_to_multiple(image.decode_image(path), engine.card.spatial_factor)
    print(f"photo {path.name}: {pixels.shape[1]}x{pixels.shape[0]}")
    t0 = time.perf_counter()
    latents = engine.encode(pixels)
    t1 = time.perf_counter()
    restored = engine.decode(latents)[0]
    t2 = time.perf_counter()
    quality = psnr(pixels, restored)
    print(f"encode {1e3 * (t1 - t0):7.1f} ms -> latents {tuple(latents.shape)}")
    print(f"decode {1e3 * (t2 - t1):7.1f} ms -> image {restored.shape[1]}x{restored.shape[0]}")
    print(f"reconstruction PSNR {quality:.2f} dB")
    side = np.concatenate([pixels, restored, latent_grid(latents[0], pixels.shape[0])], axis=1)
    (output / "side_by_side.png").write_bytes(image.encode_image(side, "png"))
    (output / "reconstruction.png").write_bytes(image.encode_image(restored, "png"))
    latents_file.save_latents(
        output / "latents.safetensors",
        {"latents": latents},
        {"model": engine.card.name, "source": path.name},
    )
    print(
        f"wrote {output}/side_by_side.png (original | reconstruction | latent channels), "
        f"reconstruction.png, latents.safetensors in {time.perf_counter() - start:.1f} s"
    )
    return {"psnr_db": quality, "encode_ms": 1e3 * (t1 - t0), "decode_ms": 1e3 * (t2 - t1)}
