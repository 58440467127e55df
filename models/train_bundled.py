"""Trains vaelink's bundled model, `vaelink-tiny`, from scratch on the CPU, and exports it into the
package (python/vaelink/models/vaelink-tiny/), so that vaelink works offline out of the box.

    python models/train_bundled.py                 # the shipped run (seeded; see models/README.md)
    python models/train_bundled.py --steps 50      # a quick smoke run into a scratch folder
    python models/train_bundled.py --photos packages --threads 2 \
        --output /tmp/packages/vaelink-tiny        # the trial on more varied photos (not shipped)

The model is an AutoencoderTiny-style (TAESD-family) autoencoder: spatial factor 8, 16 latent
channels (like taesd3 / taef1), 48-wide conv blocks. Training data (models/photos.py): openly
licensed photos shipped inside scikit-image (colour photos drawn three times as often as gray ones)
plus scikit-learn's `china.jpg`, random crops with flips and colour jitter; `chelsea`, `rocket`,
scikit-learn's `flower.jpg` and matplotlib's `grace_hopper.jpg` are held out. Loss: mean squared
error plus 0.1 x L1 on pixels in [-1, 1]; gradients clipped to norm 1.

Only the defaults reproduce the shipped model and export into the package; any other width, step
count, photo set or thread count exports into a scratch folder. The torch weights are saved too
(diffusers' format): a package run's in models/vaelink-tiny/, a scratch run's beside its export.
`--photos skimage` leaves out `china.jpg` and scikit-image's gray `clock` (the 32-wide model before,
with `--width 32 --steps 7000 --clip 0`); `--photos packages` adds the photos of pinned PyPI and
Debian packages (SciPy, mahotas, MATE, Plasma; models/photos.py), which did not do better.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny
from photos import (
    BUNDLED_COLOUR,
    BUNDLED_GRAY,
    BUNDLED_HELD_OUT,
    COLOUR,
    GRAY,
    HELD_OUT,
    PACKAGES_COLOUR,
    PACKAGES_GRAY,
    PACKAGES_HELD_OUT,
    augment,
    training_photos,
)

from vaelink.cards import get_card
from vaelink.export import export_vae

PACKAGE_EXPORT = (
    Path(__file__).resolve().parents[1] / "python" / "vaelink" / "models" / "vaelink-tiny"
)
TRAINING_RECORD = Path(__file__).resolve().parent / "vaelink-tiny-training.json"
# The shipped model's torch weights (diffusers format), for fine-tuning or warm starts.
WEIGHTS = Path(__file__).resolve().parent / "vaelink-tiny"
WIDTH, STEPS, CLIP, PHOTOS, THREADS = 48, 8000, 1.0, "more", 1  # the shipped model's
# Photo sets (models/photos.py): name -> (colour, gray, held out).
PHOTO_SETS = {
    "skimage": (COLOUR, GRAY, HELD_OUT),
    "more": (BUNDLED_COLOUR, BUNDLED_GRAY, BUNDLED_HELD_OUT),
    "packages": (PACKAGES_COLOUR, PACKAGES_GRAY, PACKAGES_HELD_OUT),
}


def build_model(width: int = WIDTH) -> AutoencoderTiny:
    torch.manual_seed(0)
    return AutoencoderTiny(
        encoder_block_out_channels=(width,) * 4,
        decoder_block_out_channels=(width,) * 4,
        num_encoder_blocks=(1, 2, 2, 2),
        num_decoder_blocks=(2, 2, 2, 1),
        latent_channels=16,
    )


def train(
    steps: int,
    batch: int,
    crop: int,
    lr: float,
    log_every: int,
    width: int = WIDTH,
    photo_set: str = PHOTOS,
    clip: float | None = CLIP,
) -> tuple[AutoencoderTiny, dict]:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    colour, gray, _ = PHOTO_SETS[photo_set]
    photos = training_photos(colour, gray)
    model = build_model(width).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=steps, pct_start=0.05
    )
    rng = random.Random(0)
    start = time.time()
    history = []
    for step in range(1, steps + 1):
        x = torch.from_numpy(
            np.stack([augment(rng.choice(photos), crop, rng) for _ in range(batch)])
        )
        y = model.decoder(model.encoder(x))
        mse = torch.mean((y - x) ** 2)
        loss = mse + 0.1 * torch.mean(torch.abs(y - x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            psnr = 10 * np.log10(4 / mse.item())  # peak-to-peak 2 in [-1, 1]
            history.append(
                {
                    "step": step,
                    "loss": loss.item(),
                    "train_psnr_db": psnr,
                    "seconds": time.time() - start,
                }
            )
            print(
                f"step {step:5d}  loss {loss.item():.4f}  train PSNR {psnr:5.2f} dB  "
                f"{time.time() - start:6.0f} s",
                flush=True,
            )
    model.eval()
    return model, {
        "steps": steps,
        "batch": batch,
        "crop": crop,
        "lr": lr,
        "seconds": time.time() - start,
        "history": history,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--width", type=int, default=WIDTH, help="channels of every conv block")
    parser.add_argument(
        "--photos",
        choices=PHOTO_SETS,
        default=PHOTOS,
        help="training photos: scikit-image's, 'more' (with china.jpg and clock), or 'packages' "
        "(also those of pinned PyPI and Debian packages)",
    )
    parser.add_argument("--clip", type=float, default=CLIP, help="gradient norm clipping (0: none)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"export folder (default: {PACKAGE_EXPORT} for the full run)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, record = train(
        args.steps,
        args.batch,
        args.crop,
        args.lr,
        log_every=50,
        width=args.width,
        photo_set=args.photos,
        clip=args.clip,
    )
    shipped = args.steps >= STEPS and args.width == WIDTH and args.photos == PHOTOS
    shipped = shipped and args.clip == CLIP and args.threads == THREADS
    output = args.output or (PACKAGE_EXPORT if shipped else Path("vaelink-tiny-scratch"))
    record.update(width=args.width, photos=args.photos, clip=args.clip, threads=args.threads)
    colour, gray, held_out = PHOTO_SETS[args.photos]
    source = {
        "location": "models/train_bundled.py",
        "training": {k: v for k, v in record.items() if k != "history"},
        "train_photos": colour + gray,
        "held_out_photos": held_out,
    }
    export_vae(
        model, get_card("vaelink-tiny"), output, variants=("float32", "float16"), source=source
    )
    # the loss curve: models/vaelink-tiny-training.json for the package, else beside the export
    if output == PACKAGE_EXPORT:
        recorded, weights = TRAINING_RECORD, WEIGHTS
    else:
        recorded = output.parent / f"{output.name}-training.json"
        weights = output.parent / f"{output.name}-weights"
    model.save_pretrained(weights)
    recorded.write_text(json.dumps(record, indent=2) + "\n")
    print(f"exported to {output}")


if __name__ == "__main__":
    main()
