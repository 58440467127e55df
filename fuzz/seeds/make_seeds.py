"""Writes the small seed corpora under fuzz/seeds/<target>/ (run from anywhere, with Pillow + numpy).

    .venv/bin/python fuzz/seeds/make_seeds.py

The decompress seeds use vaelink's own compressor when the `vaelink` package is importable; the
safetensors seeds are written by hand (the format is an 8-byte header length, JSON, then the data).
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def write(target: str, name: str, data: bytes) -> None:
    out = HERE / target
    out.mkdir(exist_ok=True)
    (out / name).write_bytes(data)


def image_seeds() -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(rng.integers(0, 256, (5, 4, 4), dtype=np.uint8), "RGBA")
    gray = rgb.convert("L")

    def save(img: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    seeds = {
        "rgb.png": save(rgb, "PNG"),
        "rgba.png": save(rgba, "PNG"),
        "gray.png": save(gray, "PNG"),
        "la.png": save(rgba.convert("LA"), "PNG"),
        "palette.png": save(rgb.convert("P", palette=Image.ADAPTIVE, colors=4), "PNG"),
        "palette_trns.png": save(
            rgb.convert("P", palette=Image.ADAPTIVE, colors=4), "PNG", transparency=1
        ),
        "bilevel.png": save(gray.convert("1"), "PNG"),
        "gray16.png": save(Image.fromarray(rng.integers(0, 65536, (3, 5), dtype=np.uint16)), "PNG"),
        "optimized.png": save(rgb, "PNG", optimize=True),
        "baseline.jpg": save(rgb, "JPEG", quality=80),
        "progressive.jpg": save(rgb, "JPEG", quality=80, progressive=True),
        "gray.jpg": save(gray, "JPEG", quality=80),
        "cmyk.jpg": save(rgb.convert("CMYK"), "JPEG", quality=80),
        "subsampled.jpg": save(rgb.resize((17, 9)), "JPEG", quality=50, subsampling=2),
        "lossy.webp": save(rgb, "WEBP", quality=50),
        "lossy_alpha.webp": save(rgba, "WEBP", quality=50),
        "lossless.webp": save(rgb, "WEBP", lossless=True),
        "lossless_alpha.webp": save(rgba, "WEBP", lossless=True),
        "animated.webp": save(
            rgb,
            "WEBP",
            save_all=True,
            lossless=True,
            append_images=[rgb.transpose(Image.FLIP_LEFT_RIGHT)],
            duration=50,
        ),
    }
    for name, data in seeds.items():
        write("decode_image", name, data)


def safetensors_bytes(
    tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str] | None
) -> bytes:
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset, body = 0, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        body += data
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def safetensors_seeds() -> None:
    write(
        "safetensors",
        "one_f32.safetensors",
        safetensors_bytes({"latents": ("F32", [1, 4, 2, 2], bytes(range(64)))}, {"model": "sd15"}),
    )
    write(
        "safetensors",
        "two.safetensors",
        safetensors_bytes({"a": ("BF16", [3], b"\x01" * 6), "b": ("U8", [2, 2], b"abcd")}, None),
    )
    write(
        "safetensors",
        "f16.safetensors",
        safetensors_bytes({"x": ("F16", [1, 1, 2], b"\x00\x3c\x00\xbc")}, {}),
    )


def decompress_seeds() -> None:
    try:
        import vaelink
    except ImportError:
        print("vaelink not importable: skipping decompress seeds")
        return
    rng = np.random.default_rng(1)
    arrays = {
        "f32.vlz": (np.sin(np.arange(64, dtype=np.float32) / 7)).reshape(1, 4, 4, 4),
        "f16.vlz": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "u8.vlz": rng.integers(0, 256, (5, 6), dtype=np.uint8),
        "zeros_5d.vlz": np.zeros((1, 2, 2, 2, 2), dtype=np.float32),
    }
    for name, array in arrays.items():
        write("decompress", name, vaelink.compress(array))


def wire_seeds() -> None:
    for i, (length, text) in enumerate(
        [
            (131072, "[1,4,128,128]\nfloat16"),
            (24, "[2, 3, 4]\nuint8"),
            (0, "[]\nfloat32"),
            (16, "[1,-4,8]\nbfloat16"),
            (8, "[18446744073709551615,2]\nuint8"),
        ]
    ):
        write("wire", f"seed{i}", struct.pack("<Q", length) + text.encode())


if __name__ == "__main__":
    image_seeds()
    safetensors_seeds()
    decompress_seeds()
    wire_seeds()
