"""The training photos shared by the training scripts in models/: the openly licensed samples that
ship inside scikit-image, loaded as uint8 RGB, and the crop / flip / colour-jitter augmentation.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image
from skimage import data

COLOUR = [
    "astronaut",
    "coffee",
    "motorcycle_left",
    "motorcycle_right",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "logo",
]
GRAY = ["camera", "moon", "coins", "brick", "grass", "gravel", "page", "cell"]
TRAIN = COLOUR + GRAY
COLOUR_WEIGHT = 3  # colour photos are drawn three times as often as gray ones
HELD_OUT = ["chelsea", "rocket"]


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample as uint8 RGB (gray replicated, alpha dropped)."""
    if name == "motorcycle_left":
        image = data.stereo_motorcycle()[0]
    elif name == "motorcycle_right":
        image = data.stereo_motorcycle()[1]
    else:
        image = getattr(data, name)()
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        image = (255 * (image - image.min()) / max(1e-8, np.ptp(image))).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def training_photos() -> list[np.ndarray]:
    """The training photos, colour ones repeated COLOUR_WEIGHT times (for uniform drawing)."""
    return [load_photo(name) for name in COLOUR] * COLOUR_WEIGHT + [load_photo(n) for n in GRAY]


def augment(image: np.ndarray, crop: int, rng: random.Random) -> np.ndarray:
    """Random rescale, crop, flip and colour jitter -> float32 CHW in [-1, 1]."""
    h, w = image.shape[:2]
    scale = rng.uniform(max(crop / min(h, w), 0.35), 1.0)
    size = (max(crop, round(w * scale)), max(crop, round(h * scale)))
    img = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC), np.float32) / 255
    y, x = rng.randrange(img.shape[0] - crop + 1), rng.randrange(img.shape[1] - crop + 1)
    img = img[y : y + crop, x : x + crop]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    gray = img.mean(axis=2, keepdims=True)
    img = gray + (img - gray) * rng.uniform(0.8, 1.2)  # saturation
    img = (
        (img - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.08, 0.08)
    )  # contrast, brightness
    img = np.clip(img, 0, 1)
    return np.ascontiguousarray((img * 2 - 1).transpose(2, 0, 1))


def square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, resized (Lanczos) to size x size."""
    h, w = image.shape[:2]
    side = min(h, w)
    crop = image[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.LANCZOS)
    )
