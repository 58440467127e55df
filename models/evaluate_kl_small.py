"""Reconstruction quality of `kl-small` (models/train_kl_small.py) and the seams of diffusers-style
tiling on it, with torch and diffusers on the CPU.

    python models/evaluate_kl_small.py [--model models/kl-small]

- PSNR at 256 x 256 (centre square, Lanczos) and at full size (cropped to a multiple of 8) on the
  photos held out of training (scikit-image's `chelsea` and `rocket`) and on a photo from another
  source (matplotlib's `grace_hopper.jpg`); posterior means, float32.
- Seams: `chelsea` upscaled to 1024 x 1024 (Lanczos) is encoded untiled; its latents are decoded
  untiled and with diffusers' `enable_tiling()` (256-pixel tiles, 32 latents, a quarter overlap:
  16 tiles, each normalised by its own GroupNorm statistics), and with vaelink's local engine (ONNX
  Runtime, an export made here in a temporary folder, the same 256-pixel tiles) in its three tiling
  modes: exact, fast (statistics from a downscaled pass) and blended. Reports PSNR and the largest
  pixel difference of each against the untiled decode, and writes models/kl-small-tiling.png:
  untiled | diffusers tiled | vaelink exact on top; below, |tiled - untiled| x 4 as heat maps:
  vaelink fast (under untiled), diffusers tiled, vaelink exact.

Writes models/kl-small-evaluation.json.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import tomllib
from pathlib import Path

import matplotlib
import numpy as np
import torch
from diffusers import AutoencoderKL
from photos import HELD_OUT, load_photo, square
from PIL import Image

from vaelink.cards import ModelCard
from vaelink.engine import Engine
from vaelink.export import export_vae

HERE = Path(__file__).resolve().parent
TILE = 256
AMPLIFY = 4


def multiple_of_8(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return image[(h % 8) // 2 : (h % 8) // 2 + h - h % 8, (w % 8) // 2 : (w % 8) // 2 + w - w % 8]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else float(10 * math.log10(255**2 / mse))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    return (x / 127.5 - 1)[None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    y = ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(1, 2, 0).numpy()


@torch.no_grad()
def encode(vae: AutoencoderKL, image: np.ndarray) -> torch.Tensor:
    return vae.encode(to_tensor(image)).latent_dist.mode()


@torch.no_grad()
def decode(vae: AutoencoderKL, z: torch.Tensor) -> np.ndarray:
    return to_uint8(vae.decode(z).sample)


def photos() -> dict[str, np.ndarray]:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    out = {f"{name} (held out)": load_photo(name) for name in HELD_OUT}
    out["grace_hopper (matplotlib)"] = hopper
    return out


def heat_map(untiled: np.ndarray, tiled: np.ndarray) -> np.ndarray:
    diff = np.abs(untiled.astype(np.float32) - tiled.astype(np.float32)).mean(axis=2)
    colours = matplotlib.colormaps["inferno"](np.clip(diff * AMPLIFY / 255, 0, 1))
    return (colours[:, :, :3] * 255).round().astype(np.uint8)


def vaelink_decodes(vae: AutoencoderKL, z: torch.Tensor) -> dict[str, np.ndarray]:
    """`z` (unscaled) decoded by the local engine, tiled in each mode, as uint8 HWC."""
    card = ModelCard.from_dict(tomllib.loads((HERE / "kl-small.toml").read_text()))
    latents = card.scaling.apply(z.numpy())
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_vae(vae, card, Path(tmp) / "kl-small", variants=("float32",))
        engine = Engine(folder, provider="cpu", dtype="float32", tile_size=TILE)
        return {
            mode: engine.decode(latents, tile=True, tiling=mode)[0]
            for mode in ("exact", "fast", "blended")
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=HERE / "kl-small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--panel", type=int, default=512, help="side of each PNG panel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(args.model).eval()

    rows = {}
    for name, photo in photos().items():
        small = square(photo, 256)
        full = multiple_of_8(photo)
        rows[name] = {
            "psnr_256_db": psnr(small, decode(vae, encode(vae, small))),
            "full_size": list(full.shape[:2]),
            "psnr_full_db": psnr(full, decode(vae, encode(vae, full))),
        }
        print(
            f"{name:28s} 256: {rows[name]['psnr_256_db']:.2f} dB   "
            f"full {full.shape[1]}x{full.shape[0]}: {rows[name]['psnr_full_db']:.2f} dB"
        )

    big = square(load_photo("chelsea"), 1024)
    z = encode(vae, big)
    untiled = decode(vae, z)
    vae.enable_tiling()
    vae.tile_sample_min_size = TILE
    vae.tile_latent_min_size = TILE // 8
    vae.tile_overlap_factor = 0.25
    tiled = decode(vae, z)
    vae.disable_tiling()
    ours = vaelink_decodes(vae, z)
    diff = np.abs(untiled.astype(int) - tiled.astype(int))
    tiling = {
        "image": "chelsea, centre square upscaled to 1024 x 1024 (Lanczos)",
        "tile_px": TILE,
        "tile_latents": TILE // 8,
        "overlap_factor": 0.25,
        "psnr_untiled_vs_original_db": psnr(big, untiled),
        "psnr_tiled_vs_original_db": psnr(big, tiled),
        "psnr_diffusers_tiled_vs_untiled_db": psnr(untiled, tiled),
        "max_abs_diff": int(diff.max()),
        "mean_abs_diff": float(diff.mean()),
    }
    for mode, image in ours.items():
        tiling[f"psnr_vaelink_{mode}_vs_untiled_db"] = psnr(untiled, image)
        tiling[f"vaelink_{mode}_max_abs_diff"] = int(np.abs(untiled.astype(int) - image).max())
    print(f"diffusers-tiled vs untiled decode at 1024: {tiling}")

    panels = [
        [untiled, tiled, ours["exact"]],
        [heat_map(untiled, h) for h in (ours["fast"], tiled, ours["exact"])],
    ]
    side = args.panel
    canvas = Image.new("RGB", (3 * side, 2 * side))
    for row, images in enumerate(panels):
        for i, panel in enumerate(images):
            tile = Image.fromarray(panel).resize((side, side), Image.LANCZOS)
            canvas.paste(tile, (i * side, row * side))
    png = HERE / "kl-small-tiling.png"
    canvas.save(png, optimize=True)
    print(f"wrote {png} ({png.stat().st_size / 1e6:.2f} MB)")

    results = {
        "model": str(args.model.resolve().relative_to(HERE.parent))
        if args.model.resolve().is_relative_to(HERE.parent)
        else str(args.model),
        "photos": rows,
        "tiling_1024": tiling,
        "png": png.name,
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
    }
    out = HERE / "kl-small-evaluation.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
