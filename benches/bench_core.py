"""Benchmarks of the Rust core against the peers a user would otherwise call, in the same run.

    python benches/bench_core.py            # writes benches/results/core-<machine>.json

- JPEG decode vs Pillow and simplejpeg (both libjpeg-turbo, as vaelink now is), photos at
  512/1024/2048, interleaved rounds;
- JPEG encode at quality 90, 4:2:0, vs Pillow and simplejpeg (libjpeg-turbo, one thread each;
  vaelink encodes strips on every core), interleaved rounds; file size and PSNR side by side;
- WebP: lossless encode (size and time) vs libwebp's defaults through Pillow, and decode of a
  lossy WebP vs Pillow and OpenCV (libwebp in all three), interleaved rounds;
- PNG encode: vaelink's fast setting vs Pillow's default level (what diffusers' `remote_encode` uses);
- pre/post-processing vs the numpy reference expressions;
- wire body and bfloat16 conversion throughput vs a plain memory copy.
"""

from __future__ import annotations

import io
import sys

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import interleaved_ms, median_seconds, photo, pillow_jpeg, psnr, write_results

import vaelink

SIZES = (512, 1024, 2048)


def jpeg_decode(pixels: np.ndarray) -> dict[str, float]:
    import simplejpeg
    from PIL import Image

    data = pillow_jpeg(pixels)
    calls = {
        "vaelink": lambda: vaelink.decode_image(data),
        "pillow": lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
        "simplejpeg": lambda: simplejpeg.decode_jpeg(data),
    }
    row: dict[str, float] = {f"{k}_ms": v for k, v in interleaved_ms(calls).items()}
    return {**row, "bytes": len(data)}


def jpeg_encode(pixels: np.ndarray) -> dict[str, float]:
    import simplejpeg
    from PIL import Image

    img = Image.fromarray(pixels)

    def pillow() -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)  # 4:2:0, Pillow's default
        return buf.getvalue()

    calls = {
        "vaelink": lambda: vaelink.encode_image(pixels, "jpeg", quality=90),
        "pillow": pillow,
        "simplejpeg": lambda: simplejpeg.encode_jpeg(pixels, 90, colorsubsampling="420"),
    }
    row: dict[str, float] = {f"{k}_ms": v for k, v in interleaved_ms(calls).items()}
    for name, call in calls.items():
        data = call()
        row[f"{name}_bytes"] = len(data)
        row[f"{name}_psnr_db"] = psnr(
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), pixels
        )
    return row


def webp(pixels: np.ndarray) -> dict[str, float]:
    import cv2
    from PIL import Image

    img = Image.fromarray(pixels)

    def pillow_lossless() -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="WEBP", lossless=True, quality=75, method=4)  # libwebp's defaults
        return buf.getvalue()

    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=90)
    lossy = buf.getvalue()
    array = np.frombuffer(lossy, np.uint8)
    row = {
        f"encode_{k}": v
        for k, v in interleaved_ms(
            {
                "vaelink_ms": lambda: vaelink.encode_image(pixels, "webp"),
                "pillow_ms": pillow_lossless,
            },
            rounds=5,
        ).items()
    }
    row["encode_vaelink_bytes"] = len(vaelink.encode_image(pixels, "webp"))
    row["encode_pillow_bytes"] = len(pillow_lossless())
    decoded = interleaved_ms(
        {
            "vaelink_ms": lambda: vaelink.decode_image(lossy),
            "pillow_ms": lambda: np.asarray(Image.open(io.BytesIO(lossy)).convert("RGB")),
            "opencv_ms": lambda: cv2.cvtColor(
                cv2.imdecode(array, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
            ),
        }
    )
    row.update({f"decode_{k}": v for k, v in decoded.items()})
    return row


def png_encode(pixels: np.ndarray) -> dict[str, float]:
    from PIL import Image

    img = Image.fromarray(pixels)

    def pillow_default() -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")  # compress_level 6, as diffusers' remote_encode saves
        return buf.getvalue()

    ours = vaelink.encode_image(pixels, "png")
    theirs = pillow_default()
    assert np.array_equal(vaelink.decode_image(ours), pixels)
    return {
        "vaelink_fast_ms": 1e3 * median_seconds(lambda: vaelink.encode_image(pixels, "png")),
        "pillow_default_ms": 1e3 * median_seconds(pillow_default, min_runs=3),
        "vaelink_fast_bytes": len(ours),
        "pillow_default_bytes": len(theirs),
    }


def processing(pixels: np.ndarray) -> dict[str, float]:
    batch = pixels[None]
    pre_ref = lambda: np.ascontiguousarray(  # noqa: E731
        (2 * batch.astype(np.float32) / 255 - 1).transpose(0, 3, 1, 2)
    )
    tensor = pre_ref()
    post_ref = lambda: np.ascontiguousarray(  # noqa: E731
        np.round(np.clip(tensor / 2 + 0.5, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    )
    assert np.array_equal(vaelink.preprocess(batch), pre_ref())
    assert np.array_equal(vaelink.postprocess(tensor), post_ref())
    return {
        "preprocess_vaelink_ms": 1e3 * median_seconds(lambda: vaelink.preprocess(batch)),
        "preprocess_numpy_ms": 1e3 * median_seconds(pre_ref),
        "postprocess_vaelink_ms": 1e3 * median_seconds(lambda: vaelink.postprocess(tensor)),
        "postprocess_numpy_ms": 1e3 * median_seconds(post_ref),
    }


def throughput(size: int) -> dict[str, float]:
    """GB/s of input bytes for wire and bfloat16 work on a float32 latent-sized tensor."""
    x = np.random.default_rng(0).standard_normal((1, 16, size // 8, size // 8 * 8), np.float32)
    body = vaelink.to_wire(x).body
    bf = vaelink.to_bfloat16(x)
    dst = np.empty_like(x)
    gbs = lambda seconds: x.nbytes / seconds / 1e9  # noqa: E731
    return {
        "tensor_mb": x.nbytes / 1e6,
        # Two peers: copying into memory already in use, and copying into a new buffer (what any
        # function returning a new array or bytes object must do, page faults included).
        "memcpy_into_existing_gbs": gbs(median_seconds(lambda: np.copyto(dst, x))),
        "copy_to_new_bytes_gbs": gbs(median_seconds(lambda: x.tobytes())),
        "to_wire_gbs": gbs(median_seconds(lambda: vaelink.to_wire(x))),
        "from_wire_gbs": gbs(median_seconds(lambda: vaelink.from_wire(body, x.shape, "float32"))),
        "f32_to_bf16_gbs": gbs(median_seconds(lambda: vaelink.to_bfloat16(x))),
        "bf16_to_f32_gbs": gbs(median_seconds(lambda: vaelink.from_bfloat16(bf))),
    }


def main() -> None:
    results: dict[str, dict] = {
        "jpeg_decode": {},
        "jpeg_encode": {},
        "webp": {},
        "png_encode": {},
        "processing": {},
        "wire": {},
    }
    for size in SIZES:
        pixels = photo(size)
        results["jpeg_decode"][size] = jpeg_decode(pixels)
        results["jpeg_encode"][size] = jpeg_encode(pixels)
        results["webp"][size] = webp(pixels)
        results["png_encode"][size] = png_encode(pixels)
        results["processing"][size] = processing(pixels)
        results["wire"][size] = throughput(size)
    summary = {}
    for size in SIZES:
        j, p, q = (results[k][size] for k in ("jpeg_decode", "png_encode", "processing"))
        e, w = results["jpeg_encode"][size], results["webp"][size]
        summary[size] = {
            "jpeg_encode_vs_pillow": e["pillow_ms"] / e["vaelink_ms"],
            "jpeg_encode_vs_simplejpeg": e["simplejpeg_ms"] / e["vaelink_ms"],
            "jpeg_size_ratio_vs_pillow": e["vaelink_bytes"] / e["pillow_bytes"],
            "jpeg_psnr_minus_pillow_db": e["vaelink_psnr_db"] - e["pillow_psnr_db"],
            "webp_decode_vs_opencv": w["decode_opencv_ms"] / w["decode_vaelink_ms"],
            "webp_decode_vs_pillow": w["decode_pillow_ms"] / w["decode_vaelink_ms"],
            "webp_lossless_size_ratio_vs_libwebp": w["encode_vaelink_bytes"]
            / w["encode_pillow_bytes"],
            "webp_lossless_encode_vs_libwebp": w["encode_pillow_ms"] / w["encode_vaelink_ms"],
            "jpeg_decode_vs_pillow": j["pillow_ms"] / j["vaelink_ms"],
            "jpeg_decode_vs_simplejpeg": j["simplejpeg_ms"] / j["vaelink_ms"],
            "png_encode_speedup_vs_pillow": p["pillow_default_ms"] / p["vaelink_fast_ms"],
            "png_size_ratio_vs_pillow": p["vaelink_fast_bytes"] / p["pillow_default_bytes"],
            "preprocess_speedup_vs_numpy": q["preprocess_numpy_ms"] / q["preprocess_vaelink_ms"],
            "postprocess_speedup_vs_numpy": q["postprocess_numpy_ms"] / q["postprocess_vaelink_ms"],
        }
    results["summary (ratios > 1: vaelink faster; size ratio < 1: smaller)"] = summary
    path = write_results("core", results)
    for size, row in summary.items():
        print(size, {k: round(v, 2) for k, v in row.items()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
