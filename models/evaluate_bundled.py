"""Reconstruction quality of the bundled model, as shipped (its ONNX export run by the engine).

    python models/evaluate_bundled.py [--model vaelink-tiny]

PSNR and SSIM (scikit-image's) at 256 x 256 on the photos held out of training (scikit-image's
`chelsea` and `rocket`) and on a photo from another source (matplotlib's `grace_hopper.jpg`), plus the
difference between tiled and untiled decodes of a 1024 x 1024 photo. Writes
benches/results/bundled-quality-<machine>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data
from skimage.metrics import structural_similarity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
from common import write_results
from skimage_photos import square

from vaelink.demo import psnr
from vaelink.engine import Engine


def photos() -> dict[str, np.ndarray]:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    return {
        "chelsea (held out)": data.chelsea(),
        "rocket (held out)": data.rocket(),
        "grace_hopper (matplotlib)": hopper,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vaelink-tiny")
    args = parser.parse_args()
    engine = Engine(args.model, provider="cpu")
    rows = {}
    for name, photo in photos().items():
        x = square(photo, 256)
        y = engine.decode(engine.encode(x))[0]
        rows[name] = {
            "psnr_db": psnr(x, y),
            "ssim": float(structural_similarity(x, y, channel_axis=2, data_range=255)),
        }
        print(f"{name:28s} PSNR {rows[name]['psnr_db']:.2f} dB  SSIM {rows[name]['ssim']:.4f}")
    big = square(data.retina(), 1024)
    latents = engine.encode(big, tile=False)
    untiled = engine.decode(latents, tile=False)[0]
    tiled = Engine(args.model, provider="cpu", tile_size=256).decode(latents, tile=True)[0]
    tiling = {
        "tile_px": 256,
        "psnr_tiled_vs_untiled_db": psnr(untiled, tiled),
        "max_abs_diff": int(np.abs(untiled.astype(int) - tiled.astype(int)).max()),
    }
    print(f"tiled vs untiled 1024 decode: {tiling}")
    path = write_results(
        "bundled-quality", {"model": args.model, "photos_256": rows, "tiling_1024": tiling}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
