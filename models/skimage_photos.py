"""The training photos shared by the training scripts in models/: the openly licensed samples that
ship inside scikit-image (and scikit-learn's and matplotlib's, for the bundled model's trials and
evaluation), loaded as uint8 RGB, and the crop / flip / colour-jitter augmentation.

Licences: scikit-image's samples are CC0 or public domain (each loader's docstring in skimage.data);
scikit-learn's `china.jpg` and `flower.jpg` are CC BY 2.0 (sklearn/datasets/images/README.txt);
matplotlib's `grace_hopper.jpg` (evaluation only) is a public-domain US Navy photograph.
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

# `models/train_bundled.py --more-photos` also trains on scikit-learn's `china.jpg` and
# scikit-image's gray `clock`; scikit-learn's `flower.jpg` is held out with `chelsea` and `rocket`
# (and matplotlib's `grace_hopper.jpg`, models/evaluate_bundled.py). The shipped models (vaelink-tiny,
# kl-small) were trained on the lists above.
BUNDLED_COLOUR = [*COLOUR, "sklearn_china"]
BUNDLED_GRAY = [*GRAY, "clock"]
BUNDLED_TRAIN = BUNDLED_COLOUR + BUNDLED_GRAY
BUNDLED_HELD_OUT = [*HELD_OUT, "sklearn_flower", "matplotlib_grace_hopper"]


def sklearn_photo(file: str) -> np.ndarray:
    """One of the sample photos that ship inside scikit-learn (`china.jpg`, `flower.jpg`)."""
    from pathlib import Path

    import sklearn.datasets

    path = Path(sklearn.datasets.__file__).parent / "images" / file
    return np.asarray(Image.open(path).convert("RGB"))


def matplotlib_photo(file: str) -> np.ndarray:
    """One of matplotlib's sample-data photos (`grace_hopper.jpg`)."""
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data(file) as f:
        return np.asarray(Image.open(f).convert("RGB"))


def load_photo(name: str) -> np.ndarray:
    """A sample photo as uint8 RGB (gray replicated, alpha dropped): scikit-image's by name,
    `sklearn_<file>` for scikit-learn's, `matplotlib_<file>` for matplotlib's."""
    if name.startswith("sklearn_"):
        return sklearn_photo(name.removeprefix("sklearn_") + ".jpg")
    if name.startswith("matplotlib_"):
        return matplotlib_photo(name.removeprefix("matplotlib_") + ".jpg")
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


def training_photos(colour: list[str] = COLOUR, gray: list[str] = GRAY) -> list[np.ndarray]:
    """The training photos, colour ones repeated COLOUR_WEIGHT times (for uniform drawing)."""
    return [load_photo(name) for name in colour] * COLOUR_WEIGHT + [load_photo(n) for n in gray]


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
