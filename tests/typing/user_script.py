"""A user's script, checked by mypy --strict and pyright (tests/test_typing.py): vaelink's
public calls give precise types, and a misspelt option is an error before anything runs."""

from typing import assert_type

import numpy as np
import numpy.typing as npt
from PIL import Image

import vaelink

pixels = np.zeros((1, 64, 64, 3), np.uint8)

latents = vaelink.encode(pixels, output="numpy")
assert_type(latents, npt.NDArray[np.floating])
images = vaelink.decode(latents, output="numpy")
assert_type(images, npt.NDArray[np.uint8])
pngs = vaelink.decode(latents, output="png", quality=90)
assert_type(pngs, list[bytes])
photos = vaelink.decode(latents, output="pil")
assert_type(photos, list[Image.Image])

vae = vaelink.VAE("vaelink-tiny", timeout=30.0, retries=2)
assert_type(vae.encode(pixels, sample=True, seed=1, output="numpy"), npt.NDArray[np.floating])
assert_type(vae.decode(latents, output="jpeg"), list[bytes])
first: bytes = vae.decode(latents, output="webp")[0]
height: int = vae.decode(latents, output="numpy").shape[1]
