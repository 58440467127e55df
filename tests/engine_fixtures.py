"""Shared helpers for the local-engine tests: tiny seeded VAEs of every family vaelink supports, built
with diffusers, exported once per test session, and diffusers' own forward pass as the reference.

The configs are small enough (8-16 channels, one layer per block) that exporting one and running it
takes well under a second, yet keep each family's structure: quant convs or none, 4 or 16 latent
channels, a shift factor, the mid-block attention of AutoencoderKL, AutoencoderTiny's clamps."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from vaelink.cards import ModelCard
from vaelink.engine import Engine
from vaelink.export import export_vae

SEED = 1234


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread: these models are far too small to gain from more, and on a busy machine
    with few cores torch's OpenMP threads wait for each other - 1 s instead of 10 ms per forward
    pass. Each test module holds this for its duration (a module-scoped autouse fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def kl_vae(widths: tuple[int, ...], latent_channels: int, *, quant_conv: bool) -> AutoencoderKL:
    """An AutoencoderKL with `len(widths)` blocks: spatial factor `2 ** (len(widths) - 1)`."""
    torch.manual_seed(SEED)
    n = len(widths)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=widths,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    ).eval()


def tiny_vae(blocks: int, latent_channels: int) -> AutoencoderTiny:
    """An AutoencoderTiny with `blocks` encoder blocks, each after the first halving the size, and as
    many decoder blocks, each but the last doubling it: spatial factor `2 ** (blocks - 1)`.

    Its convolutions get He-normal weights: with PyTorch's default initialisation this narrow ReLU
    network decodes every latent to nearly the same flat image, which would make the comparisons
    with diffusers say little."""
    torch.manual_seed(SEED)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8,) * blocks,
        decoder_block_out_channels=(8,) * blocks,
        num_encoder_blocks=(1,) * blocks,
        num_decoder_blocks=(1,) * blocks,
        latent_channels=latent_channels,
        upsampling_scaling_factor=2,
    )
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.05)
    return vae.eval()


def _card(name: str, architecture: str, **fields: Any) -> ModelCard:
    return ModelCard(name=name, description=f"test {name}", architecture=architecture, **fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TinyConfig:
    build: Callable[[], Any]
    card: ModelCard


KL = "AutoencoderKL"
TINY = "AutoencoderTiny"

# Real cards' constants; spatial factors follow each config's number of blocks.
CONFIGS: dict[str, TinyConfig] = {
    "sd15-like": TinyConfig(
        lambda: kl_vae((8, 16), 4, quant_conv=True),
        _card("tiny-sd15", KL, latent_channels=4, scaling_factor=0.18215, spatial_factor=2),
    ),
    "sdxl-like": TinyConfig(
        lambda: kl_vae((8, 16, 16), 4, quant_conv=True),
        _card("tiny-sdxl", KL, latent_channels=4, scaling_factor=0.13025, spatial_factor=4),
    ),
    "sd3-like": TinyConfig(
        lambda: kl_vae((8, 16, 16), 16, quant_conv=False),
        _card(
            "tiny-sd3",
            KL,
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            spatial_factor=4,
        ),
    ),
    "flux-like": TinyConfig(
        # Four blocks: spatial factor 8, which Flux's latent (un)packing assumes.
        lambda: kl_vae((8, 16, 16, 16), 16, quant_conv=False),
        _card(
            "tiny-flux1",
            KL,
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            spatial_factor=8,
            packed_latents=True,
        ),
    ),
    "taesd-like": TinyConfig(
        lambda: tiny_vae(3, 4),
        _card("tiny-taesd", TINY, latent_channels=4, scaling_factor=1.0, spatial_factor=4),
    ),
    "taef1-like": TinyConfig(
        lambda: tiny_vae(4, 16),
        _card(
            "tiny-taef1",
            TINY,
            latent_channels=16,
            scaling_factor=1.0,
            spatial_factor=8,
            packed_latents=True,
        ),
    ),
}


@dataclass
class Exported:
    key: str
    vae: Any
    card: ModelCard
    folder: Path

    def engine(self, **kwargs: Any) -> Engine:
        return Engine(self.folder, provider="cpu", **kwargs)

    def copy(self, dst: Path) -> Path:
        """A private copy of the export, for tests that spoil it."""
        shutil.copytree(self.folder, dst)
        return dst

    # -- diffusers' forward pass, the reference ---------------------------------------------

    def moments(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Unscaled posterior mean and std (None for tiny autoencoders) of float NCHW images."""
        with torch.no_grad():
            encoded = self.vae.encode(torch.from_numpy(x))
        if isinstance(self.vae, AutoencoderTiny):
            return encoded.latents.numpy(), None
        dist = encoded.latent_dist
        return dist.mean.numpy(), dist.std.numpy()

    def scale(self, z: np.ndarray) -> np.ndarray:
        return (z - self.card.shift_factor) * self.card.scaling_factor

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Scaled latents of the posterior's mode."""
        return self.scale(self.moments(x)[0])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(latents) / self.card.scaling_factor + self.card.shift_factor
        with torch.no_grad():
            return self.vae.decode(z).sample.numpy()


_EXPORTS: dict[str, Exported] = {}


def exported(key: str, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The tiny model `key`, exported (float32 and float16) once per session."""
    if key not in _EXPORTS:
        config = CONFIGS[key]
        vae = config.build()
        card = config.card
        f = card.spatial_factor
        with torch.no_grad():  # the card's spatial factor and latent channels are the model's
            h = vae.encoder(torch.zeros(1, 3, 4 * f, 8 * f))
        moments = 2 * card.latent_channels if card.has_posterior else card.latent_channels
        assert tuple(h.shape) == (1, moments, 4, 8), (key, h.shape)
        folder = export_vae(vae, config.card, tmp_path_factory.mktemp("exports") / key)
        _EXPORTS[key] = Exported(key, vae, config.card, folder)
    return _EXPORTS[key]


def rel_err(actual: Any, expected: Any) -> float:
    """max |actual - expected|, relative to max |expected|."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def photo_batch(photo: np.ndarray, n: int, height: int, width: int) -> np.ndarray:
    """`n` different `height x width` uint8 crops of a photo, subsampled so each shows a fair part of
    it (real images rather than noise: smooth areas, edges)."""
    step = max(1, min(photo.shape[0] // height, photo.shape[1] // width) // 2)
    crops = []
    for i in range(n):
        y, x = 7 * i, 11 * i
        crop = photo[y : y + height * step : step, x : x + width * step : step]
        assert crop.shape[:2] == (height, width), crop.shape
        crops.append(crop)
    return np.ascontiguousarray(np.stack(crops))


def pack(latents: np.ndarray) -> np.ndarray:
    """diffusers' `FluxPipeline._pack_latents`, in torch."""
    z = torch.from_numpy(latents)
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4).numpy()
