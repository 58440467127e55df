"""Trains `kl-small`, a small AutoencoderKL (GroupNorm, mid-block attention), on the CPU in a few
minutes: vaelink's test and demonstration model for tiling, where the per-tile GroupNorm statistics
of diffusers-style tiling show as seams (random weights show agreement, not seams).

    python models/train_kl_small.py                # the recorded run (seeded; see models/README.md)
    python models/train_kl_small.py --steps 50     # a quick smoke run into a scratch folder

The model is diffusers' `AutoencoderKL` as in Stable Diffusion, shrunk: four blocks (spatial factor
8), widths (16, 32, 64, 64), one resnet per encoder block, GroupNorm with 8 groups, the mid-block
self-attention, 4 latent channels. Training data: the openly licensed photos shipped inside
scikit-image (models/photos.py, as for the bundled model; `chelsea` and `rocket` held out),
random crops with flips and colour jitter. Loss: mean squared error on pixels in [-1, 1] plus the
KL term at weight 1e-6 (relative to the per-image sum of the reconstruction loss, as Stable
Diffusion's VAEs were trained). The scaling factor is computed as diffusers does: one over the
standard deviation of the latents of the training photos.

Writes models/kl-small/ (diffusers format: config.json + diffusion_pytorch_model.safetensors),
models/kl-small-training.json and its model card, models/kl-small.toml (not one of the package's
cards: load it with `ModelCard.from_dict(tomllib.loads(...))`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from photos import HELD_OUT, TRAIN, augment, load_photo, square, training_photos

OUTPUT = Path(__file__).resolve().parent / "kl-small"
BLOCKS = (16, 32, 64, 64)
KL_WEIGHT = 1e-6


def build_model() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(BLOCKS),
        block_out_channels=BLOCKS,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=256,
        mid_block_add_attention=True,
    )


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    x = np.stack(images).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of uint8-quantised images given in [-1, 1]."""
    qa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    return float(10 * math.log10(255**2 / torch.mean((qa - qb) ** 2).item()))


def train(
    steps: int, batch: int, crop: int, lr: float, log_every: int
) -> tuple[AutoencoderKL, dict]:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    photos = training_photos()
    model = build_model().train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    rng = random.Random(0)
    start = time.time()
    history = []
    for step in range(1, steps + 1):
        x = torch.from_numpy(
            np.stack([augment(rng.choice(photos), crop, rng) for _ in range(batch)])
        )
        posterior = model.encode(x).latent_dist
        y = model.decode(posterior.sample()).sample
        mse = torch.mean((y - x) ** 2)
        kl = posterior.kl().mean()  # summed over latent elements, mean over the batch
        loss = mse + KL_WEIGHT * kl / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            psnr = 10 * np.log10(4 / mse.item())  # peak-to-peak 2 in [-1, 1]
            history.append(
                {
                    "step": step,
                    "loss": loss.item(),
                    "kl": kl.item(),
                    "train_psnr_db": psnr,
                    "seconds": time.time() - start,
                }
            )
            print(
                f"step {step:5d}  loss {loss.item():.4f}  kl {kl.item():9.1f}  "
                f"train PSNR {psnr:5.2f} dB  {time.time() - start:6.0f} s",
                flush=True,
            )
    model.eval()
    return model, {
        "steps": steps,
        "batch": batch,
        "crop": crop,
        "lr": lr,
        "kl_weight": KL_WEIGHT,
        "seconds": time.time() - start,
        "history": history,
    }


@torch.no_grad()
def scaling_factor(model: AutoencoderKL) -> tuple[float, float]:
    """1 / std of the latents (posterior means) of the training photos at 256 x 256, as diffusers
    computes it; also their mean."""
    latents = torch.cat(
        [model.encode(to_tensor([square(load_photo(n), 256)])).latent_dist.mode() for n in TRAIN]
    )
    return float(1 / latents.std()), float(latents.mean())


@torch.no_grad()
def held_out_psnr(model: AutoencoderKL) -> dict[str, float]:
    out = {}
    for name in HELD_OUT:
        x = to_tensor([square(load_photo(name), 256)])
        y = model.decode(model.encode(x).latent_dist.mode()).sample
        out[name] = psnr_db(x, y)
    return out


def card_toml(name: str, scale: float) -> str:
    """The model card (the format of python/vaelink/models/*.toml, `vaelink.cards.ModelCard`)."""
    return (
        f'name = "{name}"\n'
        "description = \"vaelink's small AutoencoderKL (GroupNorm, mid-block attention), trained on "
        'scikit-image photos: a test and demonstration model (models/train_kl_small.py)"\n'
        'architecture = "AutoencoderKL"\n'
        "latent_channels = 4\n"
        f"scaling_factor = {scale!r}\n"
        "spatial_factor = 8\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None, help=f"default: {OUTPUT}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, record = train(args.steps, args.batch, args.crop, args.lr, log_every=50)
    scale, mean = scaling_factor(model)
    model.register_to_config(scaling_factor=scale)
    record["scaling_factor"] = scale
    record["latent_mean"] = mean
    record["held_out_psnr_256_db"] = held_out_psnr(model)
    record["train_photos"] = TRAIN
    record["held_out_photos"] = HELD_OUT
    print(f"scaling factor {scale:.5f} (latent mean {mean:.4f})")
    print(f"held-out PSNR at 256 x 256: {record['held_out_psnr_256_db']}")
    output = args.output or (OUTPUT if args.steps >= 1000 else Path("kl-small-scratch"))
    model.save_pretrained(output, safe_serialization=True)
    (output.parent / f"{output.name}-training.json").write_text(json.dumps(record, indent=2) + "\n")
    (output.parent / f"{output.name}.toml").write_text(card_toml(output.name, scale))
    print(f"saved to {output}")


if __name__ == "__main__":
    main()
