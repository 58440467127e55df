"""vaelink.image against Pillow: decoding (exact for PNG and WebP, within IDCT differences for
JPEG), alpha handling, encoding, fitting to a multiple, hostile inputs, and the GIL."""

from __future__ import annotations

import io
import sys
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

import vaelink
from vaelink import (
    DecodeError,
    EncodeError,
    ImageTooLargeError,
    TensorError,
    VaelinkError,
    VaelinkWarning,
)
from vaelink.image import DEFAULT_MAX_PIXELS, ImageInfo

# -------------------------------------------------------------------------------------------------
# Lossless decoding: bit-exact with Pillow


def _with_random_alpha(rgb: np.ndarray, rng: np.random.Generator) -> Image.Image:
    image = Image.fromarray(rgb)
    image.putalpha(Image.fromarray(rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)))
    return image


def _as_mode(rgb: np.ndarray, mode: str, rng: np.random.Generator) -> Image.Image:
    if mode == "RGBA":
        return _with_random_alpha(rgb, rng)
    if mode == "P":
        return Image.fromarray(rgb).quantize(64)
    return Image.fromarray(rgb).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1"])
def test_png_photo_matches_pillow(photo, mode, rng, ref):
    data = ref.pil_encode(_as_mode(photo, mode, rng), "PNG")
    ours = vaelink.decode_image(data)
    assert ours.dtype == np.uint8 and ours.shape == photo.shape
    np.testing.assert_array_equal(ours, ref.pil_rgb(data))
    if mode == "RGB":
        np.testing.assert_array_equal(ours, photo)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_webp_lossless_photo_matches_pillow(photo, mode, rng, ref):
    # exact: keep the colour under alpha 0 (libwebp changes it otherwise, to compress better).
    data = ref.pil_encode(_as_mode(photo, mode, rng), "WEBP", lossless=True, exact=True)
    ours = vaelink.decode_image(data)
    np.testing.assert_array_equal(ours, ref.pil_rgb(data))
    np.testing.assert_array_equal(ours, photo)


@pytest.mark.parametrize("quality", [50, 90])
@pytest.mark.parametrize("alpha", [False, True])
def test_webp_lossy_matches_pillow(photos, quality, alpha, ref, rng):
    # Both decode with libwebp: the same pixels, alpha dropped as Pillow's convert("RGB").
    photo = _as_mode(photos["chelsea"], "RGBA", rng) if alpha else photos["chelsea"]
    data = ref.pil_encode(photo, "WEBP", quality=quality)
    np.testing.assert_array_equal(vaelink.decode_image(data), ref.pil_rgb(data))


@pytest.mark.parametrize(
    ("height", "width"), [(1, 1), (1, 37), (29, 1), (7, 5), (64, 63), (255, 257)]
)
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_synthetic_sizes_and_layouts(height, width, channels, rng, ref):
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    data = ref.write_png(pixels)
    ours = vaelink.decode_image(data)
    np.testing.assert_array_equal(ours, ref.pil_rgb(data))
    color = pixels[..., :1].repeat(3, axis=2) if channels <= 2 else pixels[..., :3]
    np.testing.assert_array_equal(ours, color)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_interlaced_matches_pillow(channels, rng, ref):
    pixels = rng.integers(0, 256, (45, 38, channels), dtype=np.uint8)
    data = ref.write_png(pixels, interlace=True)
    ours = vaelink.decode_image(data)
    np.testing.assert_array_equal(ours, ref.pil_rgb(data))
    np.testing.assert_array_equal(ours[..., 0], pixels[..., 0])


@pytest.mark.parametrize("bit_depth", [1, 2, 4])
def test_png_low_bit_depth_gray_is_scaled_like_pillow(bit_depth, rng, ref):
    levels = rng.integers(0, 2**bit_depth, (19, 23), dtype=np.uint8)
    levels[0, :2] = (0, 2**bit_depth - 1)  # both extremes present
    bits = np.unpackbits(levels[..., None], axis=2)[..., 8 - bit_depth :].reshape(19, -1)
    rows = np.packbits(bits, axis=1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    data = (
        ref.png_header(23, 19, bit_depth, 0)
        + ref.png_chunk(b"IDAT", zlib.compress(raw))
        + ref.png_chunk(b"IEND", b"")
    )
    ours = vaelink.decode_image(data)
    np.testing.assert_array_equal(ours, ref.pil_rgb(data))
    expected = (levels.astype(np.uint32) * 255 // (2**bit_depth - 1)).astype(np.uint8)
    np.testing.assert_array_equal(ours[..., 1], expected)


def _palette_image(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (40, 30), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.tobytes())
    return image, palette, index


@pytest.mark.parametrize("transparency", ["one-index", "alpha-table"])
@pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")
def test_png_palette_with_transparency(transparency, rng, ref):
    image, palette, index = _palette_image(rng)
    alphas = rng.integers(0, 256, 16, dtype=np.uint8)
    alphas[:2] = (0, 255)
    if transparency == "one-index":
        alphas = np.full(16, 255, np.uint8)
        alphas[3] = 0
        trns = 3
    else:
        trns = alphas.tobytes()
    data = ref.pil_encode(image, "PNG", transparency=trns)
    # Default: alpha dropped, stored palette colours kept, exactly as Pillow's convert("RGB").
    ours = vaelink.decode_image(data)
    np.testing.assert_array_equal(ours, ref.pil_rgb(data))
    np.testing.assert_array_equal(ours, palette[index])
    # Composited over a background: the rounded blend of every pixel's palette alpha.
    for bg in [(255, 255, 255), (12, 200, 99)]:
        expected = ref.blend_reference(palette[index], alphas[index], bg)
        np.testing.assert_array_equal(vaelink.decode_image(data, background=bg), expected)


def test_png_palette_without_transparency_ignores_background(rng, ref):
    image, palette, index = _palette_image(rng)
    data = ref.pil_encode(image, "PNG")
    np.testing.assert_array_equal(vaelink.decode_image(data, background=(1, 2, 3)), palette[index])


# -------------------------------------------------------------------------------------------------
# 16-bit PNG: the documented behaviour is "keep the high byte"


def test_png_16bit_gray_saved_by_pillow_keeps_high_byte(rng, ref):
    values = rng.integers(0, 65536, (33, 47), dtype=np.uint16)
    values[0, :4] = (0, 255, 256, 65535)
    data = ref.pil_encode(Image.fromarray(values), "PNG")  # mode "I;16"
    with Image.open(io.BytesIO(data)) as reread:
        assert reread.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(reread), values)  # the file holds what we think
    high = (values >> 8).astype(np.uint8)
    np.testing.assert_array_equal(vaelink.decode_image(data), np.repeat(high[..., None], 3, axis=2))
    # (Pillow's own convert("RGB") of "I;16" clips to 255 instead, so it is no reference here.)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_16bit_hand_written_keeps_high_byte(channels, rng, ref):
    values = rng.integers(0, 65536, (21, 34, channels), dtype=np.uint16)
    values[0, 0] = 0x12FF  # a high byte of 0x12 must not round up to 0x13
    values[0, 1] = 0xFF00
    values[0, 2] = 0x00FF
    data = ref.write_png(values)
    high = (values >> 8).astype(np.uint8)
    expected = high[..., :1].repeat(3, axis=2) if channels <= 2 else high[..., :3]
    ours = vaelink.decode_image(data)
    np.testing.assert_array_equal(ours, expected)
    if channels >= 3:  # Pillow reads 16-bit RGB/RGBA as 8-bit by keeping the high byte too
        np.testing.assert_array_equal(ours, ref.pil_rgb(data))
    if channels in (2, 4):
        # With a background, alpha is its high byte as well.
        expected_bg = ref.blend_reference(expected, high[..., -1], (255, 255, 255))
        np.testing.assert_array_equal(
            vaelink.decode_image(data, background=(255, 255, 255)), expected_bg
        )


# -------------------------------------------------------------------------------------------------
# JPEG: zune-jpeg against libjpeg-turbo. The tolerances below are from measurements on the three
# photos (Pillow 13): 4:2:0 colour mean |diff| <= 0.24, max 6; 4:4:4 mean 0.012, max 3; gray and
# CMYK (stored without subsampling) mean <= 0.01, max 1. They differ in IDCT rounding and in the
# chroma upsampling filter; the bounds leave about 2x headroom on the means.

JPEG_CASES = {
    "baseline-420": ("RGB", {"quality": 90}, 0.5, 8),
    "progressive-420": ("RGB", {"quality": 75, "progressive": True}, 0.5, 8),
    "baseline-444": ("RGB", {"quality": 95, "subsampling": 0}, 0.05, 4),
    "baseline-422": ("RGB", {"quality": 60, "subsampling": 1}, 0.3, 6),
    "gray": ("L", {"quality": 90}, 0.05, 1),
    "gray-progressive": ("L", {"quality": 80, "progressive": True}, 0.05, 1),
    "cmyk": ("CMYK", {"quality": 90}, 0.05, 2),
    "cmyk-progressive": ("CMYK", {"quality": 75, "progressive": True}, 0.05, 2),
}


@pytest.mark.parametrize("case", list(JPEG_CASES))
def test_jpeg_photo_close_to_pillow(photo, case, ref):
    mode, params, mean_tol, max_tol = JPEG_CASES[case]
    data = ref.pil_encode(Image.fromarray(photo).convert(mode), "JPEG", **params)
    ours = vaelink.decode_image(data).astype(np.int16)
    theirs = ref.pil_rgb(data).astype(np.int16)
    assert ours.shape == theirs.shape == photo.shape
    diff = np.abs(ours - theirs)
    assert diff.mean() < mean_tol, diff.mean()
    assert diff.max() <= max_tol, diff.max()
    if mode == "L":
        assert (ours[..., 0] == ours[..., 1]).all() and (ours[..., 0] == ours[..., 2]).all()
    # And the picture really is the photo (catches e.g. inverted Adobe CMYK): JPEG error only.
    assert np.abs(ours - np.asarray(Image.fromarray(photo).convert(mode).convert("RGB"))).mean() < 6


def test_jpeg_noise_close_to_pillow(rng, ref):
    # Worst case for IDCT differences: measured mean 0.38, max 3 at 4:2:0.
    noise = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    data = ref.pil_encode(noise, "JPEG", quality=90)
    diff = np.abs(vaelink.decode_image(data).astype(np.int16) - ref.pil_rgb(data))
    assert diff.mean() < 0.8 and diff.max() <= 6


# -------------------------------------------------------------------------------------------------
# Alpha


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_alpha_dropped_by_default_and_composited_on_request(photos, fmt, rng, ref):
    rgb = photos["astronaut"]
    alpha = rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    alpha[:8] = 0  # fully transparent rows keep their stored colour when alpha is dropped
    alpha[8:16] = 255
    image = Image.fromarray(rgb)
    image.putalpha(Image.fromarray(alpha))
    params = {"lossless": True, "exact": True} if fmt == "WEBP" else {}  # exact: keep hidden RGB
    data = ref.pil_encode(image, fmt, **params)
    dropped = vaelink.decode_image(data)
    np.testing.assert_array_equal(dropped, ref.pil_rgb(data))
    np.testing.assert_array_equal(dropped, rgb)
    for bg in [(255, 255, 255), (0, 0, 0), (10, 128, 250)]:
        ours = vaelink.decode_image(data, background=bg)
        np.testing.assert_array_equal(ours, ref.blend_reference(rgb, alpha, bg))
        assert (ours[:8] == np.array(bg, np.uint8)).all()
        np.testing.assert_array_equal(ours[8:16], rgb[8:16])


def test_gray_alpha_composite(rng, ref):
    gray = rng.integers(0, 256, (31, 17), dtype=np.uint8)
    alpha = rng.integers(0, 256, (31, 17), dtype=np.uint8)
    data = ref.write_png(np.stack([gray, alpha], axis=2))
    rgb = np.repeat(gray[..., None], 3, axis=2)
    np.testing.assert_array_equal(vaelink.decode_image(data), rgb)
    bg = (255, 255, 255)
    np.testing.assert_array_equal(
        vaelink.decode_image(data, background=bg), ref.blend_reference(rgb, alpha, bg)
    )


def test_blend_rounds_to_nearest(ref):
    # Every (colour, alpha) pair over black and white backgrounds: blend must be the rounded value.
    c, a = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    rgba = np.stack([c, c, 255 - c, a], axis=2)
    data = ref.write_png(rgba)
    for bg in [(0, 0, 0), (255, 255, 255)]:
        ours = vaelink.decode_image(data, background=bg).astype(np.float64)
        alpha = a[..., None].astype(np.float64)
        exact = (rgba[..., :3] * alpha + np.array(bg) * (255.0 - alpha)) / 255
        assert np.abs(ours - exact).max() <= 0.5 + 1e-9


def test_background_on_opaque_images_changes_nothing(photos, ref):
    rgb = photos["coffee"]
    for fmt in ["PNG", "JPEG"]:
        data = ref.pil_encode(rgb, fmt)
        np.testing.assert_array_equal(
            vaelink.decode_image(data, background=(255, 0, 0)), vaelink.decode_image(data)
        )


# -------------------------------------------------------------------------------------------------
# Inputs and probing


def test_decode_accepts_bytes_bytearray_memoryview_and_paths(photos, tmp_path, ref):
    rgb = photos["chelsea"]
    data = ref.pil_encode(rgb, "PNG")
    path = tmp_path / "cat.png"
    path.write_bytes(data)
    for source in [data, bytearray(data), memoryview(data), str(path), path]:
        np.testing.assert_array_equal(vaelink.decode_image(source), rgb)
    with pytest.raises(TypeError):
        vaelink.decode_image(12345)  # type: ignore[arg-type]


def test_decoded_array_is_owned_and_writable(photos, ref):
    out = vaelink.decode_image(ref.pil_encode(photos["chelsea"], "PNG"))
    assert out.flags.c_contiguous and out.flags.writeable
    out[0, 0] = 1  # no crash, no shared read-only buffer


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp")])
def test_probe_reads_format_and_size(photos, fmt, name, ref):
    rgb = photos["coffee"]
    data = ref.pil_encode(rgb, fmt)
    info = vaelink.probe_image(data)
    assert isinstance(info, ImageInfo)
    assert info == (name, 600, 400)
    assert (info.format, info.width, info.height) == (name, 600, 400)


def test_probe_does_not_decode(ref):
    # A 100000 x 100000 header with no pixel data: probing reads the header only.
    assert vaelink.probe_image(ref.png_stub(100_000, 70_000)) == ("png", 100_000, 70_000)


def test_load_rgb_accepts_many_inputs(photos, tmp_path, ref):
    rgb = photos["chelsea"]
    data = ref.pil_encode(rgb, "PNG")
    (tmp_path / "x.png").write_bytes(data)
    np.testing.assert_array_equal(vaelink.load_rgb(data), rgb)
    np.testing.assert_array_equal(vaelink.load_rgb(tmp_path / "x.png"), rgb)
    np.testing.assert_array_equal(vaelink.load_rgb(Image.fromarray(rgb).convert("RGBA")), rgb)
    np.testing.assert_array_equal(vaelink.load_rgb(rgb), rgb)
    np.testing.assert_array_equal(vaelink.load_rgb(rgb[..., 1]), rgb[..., [1, 1, 1]])
    with pytest.raises(ImageTooLargeError):
        vaelink.load_rgb(data, max_pixels=1000)
    with pytest.raises(DecodeError):
        vaelink.load_rgb(3.5)
    with pytest.raises(EncodeError):
        vaelink.load_rgb(rgb.astype(np.float32))


# -------------------------------------------------------------------------------------------------
# Encoding


@pytest.mark.parametrize("level", [None, 0, 1, 6, 9])
def test_png_encode_round_trips_through_pillow(photo, level):
    data = vaelink.encode_image(photo, "png", png_level=level)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", photo.shape[1::-1])
        np.testing.assert_array_equal(np.asarray(image), photo)
    np.testing.assert_array_equal(vaelink.decode_image(data), photo)


def test_png_levels_trade_size(photos):
    rgb = photos["coffee"]
    sizes = {lvl: len(vaelink.encode_image(rgb, "png", png_level=lvl)) for lvl in [0, 1, 9]}
    assert sizes[0] >= rgb.nbytes  # stored: every byte plus filter bytes and framing
    assert sizes[9] <= sizes[1] < sizes[0]
    assert len(vaelink.encode_image(rgb, "png")) < sizes[0]  # the fast default compresses


def test_webp_lossless_is_libwebp_at_its_default_effort(photos, ref):
    # libwebp's defaults (quality 75, method 4; Pillow's own default quality is 80).
    rgb = photos["coffee"]
    ours = vaelink.encode_image(rgb, "webp")
    theirs = ref.pil_encode(rgb, "WEBP", lossless=True, quality=75, method=4)
    assert abs(len(ours) / len(theirs) - 1) < 0.01, (len(ours), len(theirs))


def test_webp_encode_is_lossless(photo):
    data = vaelink.encode_image(photo, "webp")
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP" and image.size == photo.shape[1::-1]
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), photo)
    np.testing.assert_array_equal(vaelink.decode_image(data), photo)


def test_encode_random_pixels_round_trip(rng):
    pixels = rng.integers(0, 256, (67, 129, 3), dtype=np.uint8)
    for fmt in ["png", "webp"]:
        data = vaelink.encode_image(pixels, fmt)
        with Image.open(io.BytesIO(data)) as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels)


def test_jpeg_quality_controls_size_and_error(photos):
    rgb = photos["coffee"]
    sizes, errors = [], []
    for quality in [10, 50, 75, 90, 100]:
        data = vaelink.encode_image(rgb, "jpeg", quality=quality)
        assert data[:3] == b"\xff\xd8\xff"
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (600, 400))
            assert not image.info.get("progressive")  # baseline
            back = np.asarray(image).astype(np.int16)
        sizes.append(len(data))
        errors.append(np.abs(back - rgb).mean())
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 2.0 and errors[0] > 4.0, errors  # 4:2:0 bounds the error at quality 100
    whole = vaelink.encode_image(rgb, "jpeg", quality=100, subsampling="4:4:4")
    assert np.abs(np.asarray(Image.open(io.BytesIO(whole))).astype(np.int16) - rgb).mean() < 1.0
    assert b"\xff\xc0" in vaelink.encode_image(rgb, "jpeg")  # SOF0: baseline DCT


@pytest.mark.parametrize(
    ("subsampling", "luma"),
    [(None, (2, 2)), ("4:2:0", (2, 2)), ("4:2:2", (2, 1)), ("4:4:4", (1, 1))],
)
def test_jpeg_chroma_subsampling_as_documented(photos, subsampling, luma):
    rgb = photos["astronaut"]
    kwargs = {} if subsampling is None else {"subsampling": subsampling}
    for quality in (50, 90, 100):  # 4:2:0 at every quality unless asked, as libjpeg and Pillow
        data = vaelink.encode_image(rgb, "jpeg", quality=quality, **kwargs)
        with Image.open(io.BytesIO(data)) as image:
            # layer: (component id, h sampling, v sampling, quant table) per component.
            assert [layer[1:3] for layer in image.layer] == [luma, (1, 1), (1, 1)]


@pytest.mark.parametrize("size", [(512, 512), (1080, 1920), (1001, 777)])
def test_jpeg_matches_libjpeg_turbo_in_size_and_error(photos, size):
    """Same quality and subsampling as Pillow (libjpeg-turbo): the same file size and error within
    a hair. Large images are encoded in strips on several threads; Pillow reads them whole."""
    rgb = np.asarray(Image.fromarray(photos["astronaut"]).resize(size[::-1], Image.LANCZOS))
    ours = vaelink.encode_image(rgb, "jpeg", quality=90)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    theirs = buf.getvalue()

    def psnr(data: bytes) -> float:
        with Image.open(io.BytesIO(data)) as image:
            back = np.asarray(image.convert("RGB")).astype(np.float64)
        return float(10 * np.log10(255**2 / np.mean((back - rgb) ** 2)))

    assert abs(len(ours) / len(theirs) - 1) < 0.02, (len(ours), len(theirs))
    assert abs(psnr(ours) - psnr(theirs)) < 0.1, (psnr(ours), psnr(theirs))


def test_encode_accepts_non_contiguous_views(photos):
    rgb = photos["astronaut"]
    view = rgb[::2, 1::3]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(vaelink.decode_image(vaelink.encode_image(view)), view)
    bgr = rgb[:, :, ::-1]
    np.testing.assert_array_equal(vaelink.decode_image(vaelink.encode_image(bgr, "webp")), bgr)


@pytest.mark.parametrize(
    "pixels",
    [
        np.zeros((8, 8, 3), np.float32),
        np.zeros((8, 8, 3), np.uint16),
        np.zeros((8, 8, 3), np.int8),
        np.zeros((8, 8), np.uint8),
        np.zeros((8, 8, 4), np.uint8),
        np.zeros((8, 8, 1), np.uint8),
        np.zeros((1, 8, 8, 3), np.uint8),
        np.zeros((0, 8, 3), np.uint8),
        np.zeros((8, 0, 3), np.uint8),
        [[[0, 0, 0]]],
    ],
    ids=lambda p: f"{np.asarray(p).dtype}{np.asarray(p).shape}",
)
@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_rejects_bad_arrays(pixels, fmt):
    with pytest.raises(EncodeError, match=r"\(height, width, 3\) uint8|empty"):
        vaelink.encode_image(pixels, fmt)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "gif"}, "unsupported image format"),
        ({"format": "jpeg", "quality": 0}, "quality"),
        ({"format": "jpeg", "quality": 101}, "quality"),
        ({"format": "jpeg", "quality": -5}, "quality"),
        ({"format": "png", "png_level": 10}, "level"),
        ({"format": "png", "png_level": -1}, "level"),
        ({"format": "jpeg", "subsampling": "420"}, "chroma subsampling"),
    ],
)
def test_encode_rejects_bad_settings(kwargs, message):
    with pytest.raises(EncodeError, match=message):
        vaelink.encode_image(np.zeros((4, 4, 3), np.uint8), **kwargs)


def test_encode_rejects_sizes_the_format_cannot_hold():
    wide = np.zeros((1, 65536, 3), np.uint8)
    with pytest.raises(EncodeError, match="too large"):
        vaelink.encode_image(wide, "jpeg")
    for shape in [(1, 16384, 3), (16384, 1, 3), (1, 16385, 3)]:
        with pytest.raises(EncodeError, match="16383 at most"):
            vaelink.encode_image(np.zeros(shape, np.uint8), "webp")
    assert vaelink.decode_image(vaelink.encode_image(wide, "png")).shape == (1, 65536, 3)


def test_webp_largest_side_round_trips(rng):
    # 16383 is the most libwebp writes and reads (WEBP_MAX_DIMENSION).
    for shape in [(2, 16383, 3), (16383, 2, 3)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        data = vaelink.encode_image(pixels, "webp")
        np.testing.assert_array_equal(vaelink.decode_image(data), pixels)
        with Image.open(io.BytesIO(data)) as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels)


# -------------------------------------------------------------------------------------------------
# fit_to_multiple


CROP_CASES = [
    (h, w, m)
    for h, w in [(9, 10), (63, 65), (300, 451), (64, 64), (17, 200)]
    for m in [1, 7, 8, 16, 64]
    if m <= min(h, w)
]


@pytest.mark.parametrize(("height", "width", "multiple"), CROP_CASES)
def test_fit_crop_is_the_centre_crop(height, width, multiple, rng):
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    th, tw = height // multiple * multiple, width // multiple * multiple
    y0, x0 = (height - th) // 2, (width - tw) // 2
    out = vaelink.fit_to_multiple(pixels, multiple, "crop")
    np.testing.assert_array_equal(out, pixels[y0 : y0 + th, x0 : x0 + tw])
    assert out.shape[0] % multiple == 0 and out.shape[1] % multiple == 0


def test_fit_crop_default_is_crop_by_8(photos):
    rgb = photos["chelsea"]  # 300 x 451 -> 296 x 448, offsets (2, 1)
    np.testing.assert_array_equal(vaelink.fit_to_multiple(rgb), rgb[2:298, 1:449])


def test_fit_crop_on_a_non_contiguous_view(photos):
    view = photos["astronaut"][5:, ::-1]
    # 507 x 512 -> 496 x 512: (507 - 496) // 2 = 5 rows off the top.
    np.testing.assert_array_equal(vaelink.fit_to_multiple(view, 16), view[5:501, :])


@pytest.mark.parametrize("multiple", [8, 16, 64])
def test_fit_resize_size_and_close_to_pillow_lanczos(photo, multiple):
    height, width = photo.shape[0] - 3, photo.shape[1] - 1
    src = np.ascontiguousarray(photo[:height, :width])
    th, tw = height // multiple * multiple, width // multiple * multiple
    out = vaelink.fit_to_multiple(src, multiple, "resize")
    assert out.shape == (th, tw, 3) and out.dtype == np.uint8
    theirs = np.asarray(Image.fromarray(src).resize((tw, th), Image.Resampling.LANCZOS))
    diff = np.abs(out.astype(np.int16) - theirs)
    # Measured: mean 0.002-0.25, 99th percentile <= 2, max up to 25 at a few specular highlights of
    # "coffee" (fast_image_resize and Pillow round their intermediate pass differently).
    assert diff.mean() < 0.5, diff.mean()
    assert np.percentile(diff, 99) <= 3
    # Resampling really happened (it is not a crop): compare with the crop.
    if th < height - multiple // 2 or tw < width - multiple // 2:
        cropped = vaelink.fit_to_multiple(src, multiple, "crop")
        assert np.abs(out.astype(np.int16) - cropped).mean() > 1


@pytest.mark.parametrize("size", [(384, 256), (97, 131), (1024, 700)])
def test_resize_image_is_close_to_pillow_lanczos(photo, size):
    # Down, odd and up: the same bound as fit_to_multiple's resize (one implementation under both).
    width, height = size
    out = vaelink.resize_image(photo, width, height)
    assert out.shape == (height, width, 3) and out.dtype == np.uint8
    theirs = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.LANCZOS))
    diff = np.abs(out.astype(np.int16) - theirs)
    assert diff.mean() < 0.5, diff.mean()
    assert np.percentile(diff, 99) <= 3
    # It resampled the picture, not some other one: far from a plain crop of the same size.
    crop = photo[:height, :width] if height <= photo.shape[0] and width <= photo.shape[1] else None
    if crop is not None:
        assert np.abs(out.astype(np.int16) - crop).mean() > 5


def test_resize_image_errors():
    pixels = np.zeros((10, 9, 3), np.uint8)
    with pytest.raises(TensorError, match="at least 1"):
        vaelink.resize_image(pixels, 0, 4)
    with pytest.raises(EncodeError, match="RGB"):
        vaelink.resize_image(np.zeros((10, 9), np.uint8), 4, 4)


@pytest.mark.parametrize("mode", ["crop", "resize"])
def test_fit_leaves_multiples_alone(photos, mode):
    rgb = photos["astronaut"]
    out = vaelink.fit_to_multiple(rgb, 64, mode)
    np.testing.assert_array_equal(out, rgb)
    assert not np.shares_memory(out, rgb)


def test_fit_errors():
    pixels = np.zeros((10, 9, 3), np.uint8)
    with pytest.raises(TensorError, match="smaller than the multiple"):
        vaelink.fit_to_multiple(pixels, 16)
    with pytest.raises(TensorError, match="at least 1"):
        vaelink.fit_to_multiple(pixels, 0)
    with pytest.raises(TensorError, match="fit mode"):
        vaelink.fit_to_multiple(pixels, 8, "stretch")  # type: ignore[arg-type]
    with pytest.raises(EncodeError):
        vaelink.fit_to_multiple(pixels.astype(np.float32), 8)
    with pytest.raises(EncodeError):
        vaelink.fit_to_multiple(pixels[..., 0], 8)
    with pytest.raises(TensorError, match="at least 1"):
        vaelink.fit_to_multiple(pixels, -8)


# -------------------------------------------------------------------------------------------------
# Hostile and broken inputs


def _assert_decode_error(data: bytes, **kwargs) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        vaelink.decode_image(data, **kwargs)
    err = info.value
    assert isinstance(err, VaelinkError) and isinstance(err, ValueError)
    assert str(err)  # a message, not an empty exception
    return err


def test_empty_and_garbage_bytes(rng):
    assert "empty" in str(_assert_decode_error(b""))
    assert "not JPEG, PNG or WebP" in str(_assert_decode_error(b"definitely not an image"))
    for n in [1, 7, 100, 10_000]:
        _assert_decode_error(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    with pytest.raises(DecodeError):
        vaelink.probe_image(b"")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused(photos, fmt, ref):
    err = _assert_decode_error(ref.pil_encode(photos["chelsea"], fmt))
    assert "unsupported image format" in str(err)


@pytest.mark.parametrize(
    ("fmt", "params"), [("PNG", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80})]
)
def test_truncated_png_and_webp_are_errors(photos, fmt, params, ref):
    data = ref.pil_encode(photos["chelsea"], fmt, **params)
    for cut in [1, 4, 8, 12, 16, 30, 33, 60, len(data) // 4, len(data) // 2, len(data) - 20]:
        _assert_decode_error(data[:cut])


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_never_crashes(photos, progressive, ref):
    data = ref.pil_encode(photos["chelsea"], "JPEG", quality=90, progressive=progressive)
    # Cut inside the headers (before the first scan): an error.
    for cut in [1, 2, 3, 10, 100, 150]:
        _assert_decode_error(data[:cut])
    # Cut inside the entropy-coded data: the image crate runs zune-jpeg in lenient mode, which
    # either fails or returns the decodable part (as browsers show it). Either way: the right shape
    # or a DecodeError, never a crash. Pillow raises OSError here unless LOAD_TRUNCATED_IMAGES.
    for cut in [len(data) // 4, len(data) // 2, len(data) - 2]:
        try:
            with pytest.warns(VaelinkWarning, match="truncated JPEG"):
                out = vaelink.decode_image(data[:cut])
        except DecodeError:
            continue
        assert out.shape == photos["chelsea"].shape and out.dtype == np.uint8


def test_truncated_jpeg_warns_naming_the_file_or_fails_when_strict(photos, ref, tmp_path):
    data = ref.pil_encode(photos["chelsea"], "JPEG", quality=90)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole JPEG (and PNG) decodes without a word
        vaelink.decode_image(data, strict=True)
        vaelink.decode_image(ref.pil_encode(photos["chelsea"], "PNG"), strict=True)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.warns(VaelinkWarning, match=r"cut\.jpg: truncated JPEG.*decode as grey"):
        vaelink.decode_image(cut)
    for source in (cut, bytearray(cut.read_bytes()), memoryview(cut.read_bytes())):
        with pytest.raises(DecodeError, match="truncated JPEG: no end-of-image marker"):
            vaelink.decode_image(source, strict=True)


def test_corrupt_bytes_inside_images_never_crash(photos, rng, ref):
    for fmt in ["PNG", "JPEG", "WEBP"]:
        data = bytearray(ref.pil_encode(photos["chelsea"][:64, :64], fmt))
        for _ in range(40):
            broken = bytearray(data)
            positions = rng.integers(0, len(broken), 8)
            broken[positions[0] : positions[0] + 1] = b""  # a dropped byte shifts everything after
            for p in positions[1:]:
                broken[min(p, len(broken) - 1)] ^= int(rng.integers(1, 256))
            try:  # a header bent to declare a huge size must not make this slow
                out = vaelink.decode_image(bytes(broken), max_pixels=256 * 256)
            except DecodeError:
                continue
            assert out.ndim == 3 and out.shape[2] == 3


def test_giant_png_header_is_refused_before_decoding(ref):
    # A valid, tiny PNG (correct CRCs) whose IHDR declares 100000 x 100000 pixels.
    data = ref.png_stub(100_000, 100_000)
    assert len(data) < 100
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        vaelink.decode_image(data)
    assert time.perf_counter() - start < 0.5
    message = str(info.value)
    assert "100000x100000" in message and str(DEFAULT_MAX_PIXELS) in message
    assert isinstance(info.value, DecodeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(("width", "height"), [(0, 10), (10, 0), (0, 0)])
def test_zero_sized_png_is_a_decode_error(width, height, ref):
    err = _assert_decode_error(ref.png_stub(width, height))
    assert not isinstance(err, ImageTooLargeError)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_max_pixels_is_configurable(photos, fmt, ref):
    rgb = photos["chelsea"]  # 300 x 451 = 135300 pixels
    data = ref.pil_encode(rgb, fmt)
    assert vaelink.decode_image(data, max_pixels=135_300).shape == rgb.shape
    for limit in [135_299, 1000, 0]:
        with pytest.raises(ImageTooLargeError, match="135300 pixels"):
            vaelink.decode_image(data, max_pixels=limit)


def test_default_max_pixels_is_64_megapixels(ref):
    assert DEFAULT_MAX_PIXELS == 8192 * 8192
    # One pixel over the limit, refused from the header alone.
    with pytest.raises(ImageTooLargeError):
        vaelink.decode_image(ref.png_stub(8192, 8193))


# -------------------------------------------------------------------------------------------------
# Errors and threads


def test_error_hierarchy():
    for cls in [DecodeError, EncodeError, TensorError, vaelink.FormatError, ImageTooLargeError]:
        assert issubclass(cls, VaelinkError) and issubclass(cls, ValueError)
    assert issubclass(ImageTooLargeError, DecodeError)
    assert not issubclass(VaelinkError, ValueError)
    assert vaelink.errors.VaelinkError is VaelinkError
    try:
        vaelink.decode_image(b"")
    except ValueError as e:  # existing `except ValueError` code keeps working
        assert type(e) is DecodeError
    else:
        pytest.fail("no error")


def test_decode_releases_the_gil(rng):
    """While a large PNG decodes in one thread, a pure-Python loop in another keeps running."""
    pixels = rng.integers(0, 256, (4096, 4096, 3), dtype=np.uint8)  # noise: slow to inflate
    data = vaelink.encode_image(pixels, "png", png_level=1)
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    spinner = threading.Thread(target=spin, daemon=True)
    interval = sys.getswitchinterval()
    # A short switch interval bounds what the spinner could get if decoding held the GIL: it only
    # runs in the switch intervals around each call, 2 ms of each ~0.3 s call (under 1%).
    sys.setswitchinterval(0.001)
    spinner.start()
    try:
        # The spinner's pace when it has a core to itself (sleeping frees the GIL).
        time.sleep(0.05)
        c0, t0 = counter[0], time.perf_counter()
        time.sleep(0.2)
        rate = (counter[0] - c0) / (time.perf_counter() - t0)
        during, seconds = 0, 0.0
        for _ in range(3):
            c0, t0 = counter[0], time.perf_counter()
            out = vaelink.decode_image(data)
            seconds += time.perf_counter() - t0
            during += counter[0] - c0
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(interval)
    assert out.shape == (4096, 4096, 3)
    # Measured: about 0.5-0.6 of the free pace with the GIL released (two cores), 0.035 when a C
    # call of the same length holds it even with the default 5 ms interval.
    assert rate > 0 and during > 0.15 * rate * seconds, (during, rate, seconds)
