"""Reconstruction quality of the bundled model, as shipped (its ONNX export run by the engine).

    python models/evaluate_bundled.py [--model vaelink-tiny] [--results bundled-quality]

PSNR and SSIM (scikit-image's) at 256 x 256 on photos from five sources (scikit-image's `chelsea`
and `rocket`, scikit-learn's `flower.jpg` and `china.jpg`, matplotlib's `grace_hopper.jpg`, MATE's
`LadyBird` and Plasma's `EveningGlow` from Debian's packages, models/photos.py), each marked held
out or trained on as the export's manifest lists its training photos, plus the
difference between tiled and untiled decodes of a 1024 x 1024 photo. Writes
benches/results/<results>-<machine>.json (not with --no-write), with the export's training record.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from skimage import data
from skimage.metrics import structural_similarity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
from common import write_results
from photos import load_photo, square

from vaelink.demo import psnr
from vaelink.engine import Engine
from vaelink.exports import read_manifest, resolve_model

PHOTOS = {  # name in models/photos.py -> (shown as, source)
    "chelsea": ("chelsea", "scikit-image"),
    "rocket": ("rocket", "scikit-image"),
    "sklearn_flower": ("flower", "scikit-learn"),
    "matplotlib_grace_hopper": ("grace_hopper", "matplotlib"),
    "mate_LadyBird": ("LadyBird", "MATE backgrounds"),
    "plasma_EveningGlow": ("EveningGlow", "Plasma wallpapers"),
    "sklearn_china": ("china", "scikit-learn"),
}


def photos(trained: list[str]) -> dict[str, np.ndarray]:
    """The photos, keyed "name (source, held out | trained on)"."""
    return {
        f"{shown} ({source}, {'trained on' if name in trained else 'held out'})": load_photo(name)
        for name, (shown, source) in PHOTOS.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vaelink-tiny", help="a name or an export folder")
    parser.add_argument("--results", default="bundled-quality", help="the results file's name")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results")
    args = parser.parse_args()
    engine = Engine(args.model, provider="cpu", dtype="float32")
    rows = {}
    folder = resolve_model(args.model).export_folder()
    source = read_manifest(folder, verify=False).source
    trained = source.get("train_photos", [])
    for name, photo in photos(trained).items():
        x = square(photo, 256)
        y = engine.decode(engine.encode(x))[0]
        rows[name] = {
            "psnr_db": psnr(x, y),
            "ssim": float(structural_similarity(x, y, channel_axis=2, data_range=255)),
        }
        print(f"{name:44s} PSNR {rows[name]['psnr_db']:.2f} dB  SSIM {rows[name]['ssim']:.4f}")
    big = square(data.retina(), 1024)
    latents = engine.encode(big, tile=False)
    untiled = engine.decode(latents, tile=False)[0]
    tiled = Engine(args.model, provider="cpu", dtype="float32", tile_size=256).decode(
        latents, tile=True
    )[0]
    tiling = {
        "tile_px": 256,
        "psnr_tiled_vs_untiled_db": psnr(untiled, tiled),
        "max_abs_diff": int(np.abs(untiled.astype(int) - tiled.astype(int)).max()),
    }
    print(f"tiled vs untiled 1024 decode: {tiling}")
    if args.no_write:
        return
    results = {"model": args.model, "training": source.get("training"), "photos_256": rows}
    path = write_results(args.results, {**results, "tiling_1024": tiling})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
