"""Shared fixtures: real photos, seeded randomness, and reference encoders/decoders (Pillow, and a
hand-written PNG writer for the layouts Pillow cannot save)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

# The engine's CPU default is bfloat16 on CPUs with native bfloat16 when OpenVINO is installed (as
# it is for the tests); the suite compares against float32 references, so it runs in float32,
# subprocesses included. tests/test_openvino_session.py asks for bfloat16 itself.
os.environ["VAELINK_CPU_DTYPE"] = "float32"

# scikit-image ships these in the installed package: no network needed.
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skdata.astronaut,  # 512 x 512
    "chelsea": skdata.chelsea,  # 300 x 451
    "coffee": skdata.coffee,  # 400 x 600
}


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """The three photos as (H, W, 3) uint8 arrays, read-only so that no test can spoil them."""
    out = {}
    for name, load in PHOTOS.items():
        image = np.ascontiguousarray(load(), dtype=np.uint8)
        assert image.ndim == 3 and image.shape[2] == 3
        image.setflags(write=False)
        out[name] = image
    return out


@pytest.fixture(params=list(PHOTOS))
def photo(request: pytest.FixtureRequest, photos: dict[str, np.ndarray]) -> np.ndarray:
    """Each photo in turn."""
    return photos[request.param]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


def pil_encode(image: Image.Image | np.ndarray, fmt: str, **params) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def pil_rgb(data: bytes) -> np.ndarray:
    """Pillow's decoding of `data`, converted to RGB as Pillow does (alpha dropped)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_header(
    width: int, height: int, bit_depth: int = 8, color_type: int = 2, interlace: int = 0
) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)


def png_stub(width: int, height: int) -> bytes:
    """A well-formed PNG (valid CRCs) whose header declares `width x height`, with a token IDAT."""
    return (
        png_header(width, height)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


# PNG colour types by channel count: gray, gray + alpha, RGB, RGBA.
PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}

# Adam7 passes: (x start, y start, x step, y step).
ADAM7 = [
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
]


def write_png(pixels: np.ndarray, *, interlace: bool = False) -> bytes:
    """A PNG of `pixels`, written from scratch: `(H, W)` gray or `(H, W, C)` with C in 1-4; 8-bit
    for uint8, 16-bit (big-endian samples, as the format stores them) for uint16. Filter 0 rows."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    if pixels.dtype == np.uint16:
        bit_depth, samples = 16, pixels.astype(">u2")
    elif pixels.dtype == np.uint8:
        bit_depth, samples = 8, pixels
    else:
        raise TypeError(pixels.dtype)
    passes = ADAM7 if interlace else [(0, 0, 1, 1)]
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        sub = samples[y0::dy, x0::dx]
        if sub.size == 0:
            continue  # empty passes have no rows, not even a filter byte
        for row in sub:
            raw += b"\x00" + row.tobytes()
    return (
        png_header(width, height, bit_depth, PNG_COLOR_TYPES[channels], int(interlace))
        + png_chunk(b"IDAT", zlib.compress(bytes(raw)))
        + png_chunk(b"IEND", b"")
    )


def blend_reference(rgb: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
    """The rounded integer blend of rust-core's decode.rs: `(c*a + bg*(255-a) + 127) // 255`."""
    c = rgb.astype(np.uint32)
    a = alpha.astype(np.uint32)[..., None]
    bg = np.asarray(background, dtype=np.uint32)
    return ((c * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """The reference helpers above, for the test modules (pytest discourages importing conftest)."""
    helpers = (pil_encode, pil_rgb, png_chunk, png_header, png_stub, write_png, blend_reference)
    return SimpleNamespace(**{f.__name__: f for f in helpers})


# -- Tiny seeded models and a live `vaelink serve`, shared by the client tests (api, compat, cli) --


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from client_fixtures import tiny_model

    return tiny_model("sdxl", tmp_path_factory)


@pytest.fixture(scope="session")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from client_fixtures import tiny_model

    return tiny_model("flux1", tmp_path_factory)


@pytest.fixture(scope="module")
def server(sdxl: Any) -> Iterator[Any]:
    """One model, no batching: each request runs alone, as the local engine does."""
    from server_fixtures import LiveServer

    from vaelink.server import Batching, create_app

    app = create_app({"sdxl": sdxl.engine()}, batching=Batching(enabled=False))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def multi(sdxl: Any, flux: Any) -> Iterator[Any]:
    """Two models, each at /<model>/."""
    from server_fixtures import LiveServer

    from vaelink.server import Batching, create_app

    engines = {"sdxl": sdxl.engine(), "flux1": flux.engine()}
    with LiveServer(create_app(engines, batching=Batching(enabled=False))) as live:
        yield live
