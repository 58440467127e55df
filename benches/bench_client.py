"""vaelink's client against diffusers' `remote_encode` / `remote_decode`, both calling the same
`vaelink serve` on loopback, in the same run.

    python benches/bench_client.py            # about 2-3 minutes on 2 cores

Two servers, each in its own process, are measured in turn:

- **replay**: the vaelink server (the real app: routing, validation, codecs, wire format) with an
  engine that answers at once with precomputed realistic arrays (a photo for every decode, seeded
  latents for every encode). What remains is what a client controls - its codecs, its transport,
  its conversions - as on a GPU server, where the VAE takes milliseconds.
- **model**: `vaelink serve --no-batching` with a real exported model, the smallest useful one: a
  seeded AutoencoderKL of SDXL's shape (widths 4-8-8-8, one layer per block, no mid-block attention)
  under the SDXL card. On this machine's CPU its engine time is most of every request; the ratios
  here show how much of an end-to-end call the client still saves.

- **encode** end to end (a PIL photo in, latents out) at 512, 1024 and 2048: diffusers saves the
  image as PNG with Pillow; vaelink sends raw uint8 pixels to a vaelink server (`VAE.encode`), or a
  fast PNG to any other endpoint (`fast_path=False`, and `vaelink.compat.remote_encode`'s fallback).
- **decode** at 1024 for each output type, diffusers' call against vaelink's equivalent
  (`vaelink.compat.remote_decode` with the same arguments, and `VAE.decode`).
- **per-request overhead**: a 1x1 latent (an 8x8 image), and `GET /health`, with `requests.post`
  (what diffusers calls: a new connection each time), a keep-alive `requests.Session` and vaelink's
  Rust client.

Clients and servers share the machine's cores. Results: benches/results/client-<machine>.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import free_port, launch_server, median_seconds, photo, write_results

warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers: do_scaling


def export_model(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL

    from vaelink.cards import get_card
    from vaelink.export import export_vae

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,
    ).eval()
    return export_vae(vae, get_card("sdxl"), folder / "sdxl", variants=("float32",))


class ReplayEngine:
    """An engine with the SDXL card that computes nothing: decode answers with a photo of the
    requested size (precomputed, as the float decoder output), encode with seeded latents."""

    def __init__(self) -> None:
        from vaelink.cards import get_card

        self.card = get_card("sdxl")
        self.provider = "cpu"
        self.dtype = "float32"
        self._cache: dict[tuple[str, tuple[int, ...]], Any] = {}

    def _cached(self, kind: str, shape: tuple[int, ...], make: Callable[[], Any]) -> Any:
        key = (kind, shape)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def decode(self, z: Any, *, output: str = "float", tile: Any = None, **_: Any) -> Any:
        import numpy as np
        from PIL import Image

        from vaelink import preprocess

        b, _, h, w = z.shape

        def make() -> Any:
            pixels = np.asarray(Image.fromarray(photo(max(h, w) * 8)).crop((0, 0, w * 8, h * 8)))
            return preprocess(pixels)

        image = self._cached("decode", (h, w), make)
        return image if b == 1 else np.repeat(image, b, axis=0)

    def encode(self, x: Any, *, sample: bool = False, noise: Any = None, **_: Any) -> Any:
        import numpy as np

        shape = (x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8)
        rng = np.random.default_rng(0)
        return self._cached("encode", shape, lambda: rng.standard_normal(shape, np.float32))


def serve_replay(port: int) -> None:
    import uvicorn

    from vaelink.server import Batching, Limits, create_app

    app = create_app(
        {"sdxl": ReplayEngine()},
        limits=Limits(max_body_bytes=512 << 20),
        batching=Batching(enabled=False),
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start_server(folder: Path | None) -> tuple[subprocess.Popen[bytes], str]:
    """`vaelink serve` for the model in `folder`, or the replay server when None."""
    port = free_port()
    if folder is None:
        command = [sys.executable, __file__, "--replay-server", str(port)]
    else:
        command = [sys.executable, "-m", "vaelink", "serve", "--model", str(folder)]
        command += ["--port", str(port), "--provider", "cpu", "--log-level", "warning"]
        command += ["--no-batching", "--max-body-mb", "512"]
    return launch_server(command, port), f"http://127.0.0.1:{port}/"


def timed(fn: Callable[[], Any], min_time: float) -> float:
    return median_seconds(fn, min_runs=3, min_time=min_time)


def row(label: str, diffusers_s: float, vaelink: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {"diffusers_ms": round(diffusers_s * 1000, 2)}
    parts = [f"{label:<34} diffusers {diffusers_s * 1000:8.1f} ms"]
    for name, seconds in vaelink.items():
        out[f"{name}_ms"] = round(seconds * 1000, 2)
        out[f"{name}_speedup"] = round(diffusers_s / seconds, 2)
        parts.append(f"{name} {seconds * 1000:7.1f} ms ({diffusers_s / seconds:5.1f}x)")
    print(" | ".join(parts), flush=True)
    return out


def bench_encode(url: str, model: str | Path, sizes: list[int], scale: float) -> dict[str, Any]:
    from diffusers.utils.remote_utils import remote_encode
    from PIL import Image

    import vaelink
    from vaelink import compat

    fast = vaelink.VAE(model, url)
    png = vaelink.VAE(model, url, fast_path=False)
    results = {}
    for size in sizes:
        image = Image.fromarray(photo(size))
        reference = remote_encode(url, image, scaling_factor=0.13025)
        assert (fast.encode(image) == reference.numpy()).all(), "vaelink differs from diffusers"
        min_time = scale * (1.0 if size <= 1024 else 0.5)
        results[str(size)] = row(
            f"encode {size}x{size}",
            timed(lambda i=image: remote_encode(url, i, scaling_factor=0.13025), min_time),
            {
                "vaelink": timed(lambda i=image: fast.encode(i), min_time),
                "vaelink_png": timed(lambda i=image: png.encode(i), min_time),
                "compat": timed(
                    lambda i=image: compat.remote_encode(url, i, scaling_factor=0.13025), min_time
                ),
            },
        )
    return results


def bench_decode(url: str, model: str | Path, size: int, scale: float, only: int) -> dict[str, Any]:
    import torch
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.remote_utils import remote_decode

    import vaelink
    from vaelink import compat

    vae = vaelink.VAE(model, url)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    factors = {"scaling_factor": 0.13025}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("pil (jpg)", {"output_type": "pil", "image_format": "jpg"}, "pil"),
        ("pil (png)", {"output_type": "pil", "image_format": "png"}, "png"),
        ("pt float (raw)", {"output_type": "pt", "return_type": "pt"}, "float"),
        (
            "pt uint8 (partial_postprocess)",
            {"output_type": "pt", "partial_postprocess": True, "return_type": "pt"},
            "torch",
        ),
        (
            "pil via pt + processor",
            {"output_type": "pt", "processor": VaeImageProcessor()},
            "pil",
        ),
    ]
    results = {}
    for label, kwargs, output in cases[:only]:
        call = {**kwargs, **factors}
        results[label] = row(
            f"decode {size}x{size} {label}",
            timed(lambda c=call: remote_decode(url, z, **c), scale),
            {
                "vaelink": timed(lambda o=output: vae.decode(z, output=o), scale),
                "compat": timed(lambda c=call: compat.remote_decode(url, z, **c), scale),
            },
        )
    return results


def bench_overhead(url: str, model: str | Path) -> dict[str, Any]:
    import numpy as np
    import requests

    import vaelink
    from vaelink._native import HttpClient
    from vaelink.remote import encode_query

    z = np.zeros((1, 4, 1, 1), np.float32)
    params = {
        "output_type": "pt",
        "partial_postprocess": True,
        "image_format": "jpg",
        "scaling_factor": 0.13025,
        "shift_factor": 0.0,
        "shape": [1, 4, 1, 1],
        "dtype": "float32",
    }
    headers = {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}
    body = z.tobytes()
    session = requests.Session()
    client = HttpClient()
    query = encode_query(params)
    vae = vaelink.VAE(model, url)

    def with_requests() -> None:
        requests.post(url, params=params, data=body, headers=headers).raise_for_status()

    def with_session() -> None:
        session.post(url, params=params, data=body, headers=headers).raise_for_status()

    def with_vaelink() -> None:
        client.request("POST", url, query, list(headers.items()), body)

    results = {
        "decode_1x1": row(
            "tiny decode: requests.post",
            timed(with_requests, 2.0),
            {
                "vaelink_client": timed(with_vaelink, 2.0),
                "vaelink_decode": timed(lambda: vae.decode(z), 2.0),
            },
        ),
        "decode_1x1_vs_session": row(
            "tiny decode: requests.Session",
            timed(with_session, 2.0),
            {"vaelink_client": timed(with_vaelink, 2.0)},
        ),
    }
    health = url + "health"
    results["health"] = row(
        "GET /health: requests.get",
        timed(lambda: requests.get(health).raise_for_status(), 2.0),
        {"vaelink_client": timed(lambda: client.request("GET", health), 2.0)},
    )
    results["health_vs_session"] = row(
        "GET /health: requests.Session",
        timed(lambda: session.get(health).raise_for_status(), 2.0),
        {"vaelink_client": timed(lambda: client.request("GET", health), 2.0)},
    )
    return results


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--replay-server":
        serve_replay(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="512,1024,2048", help="encode sizes")
    parser.add_argument("--decode-size", type=int, default=1024)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    start = time.perf_counter()
    results: dict[str, Any] = {}
    print("-- replay server: the client, transport and codecs alone", flush=True)
    process, url = start_server(None)
    try:
        results["replay"] = {
            "server": "the vaelink app in its own process, an engine that computes nothing",
            "encode": bench_encode(url, "sdxl", sizes, 1.0),
            "decode": bench_decode(url, "sdxl", args.decode_size, 1.0, only=5),
            "overhead": bench_overhead(url, "sdxl"),
        }
    finally:
        process.terminate()
        process.wait(30)
    print("-- vaelink serve with a real (tiny) model on the CPU: end to end", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_model(Path(tmp))
        process, url = start_server(folder)
        try:
            results["model"] = {
                "server": "vaelink serve --no-batching --provider cpu, in its own process",
                "model": "AutoencoderKL widths (4, 8, 8, 8), no attention, SDXL card, float32",
                "encode": bench_encode(url, folder, sizes[:2], 0.5),
                "decode": bench_decode(url, folder, args.decode_size, 0.5, only=2),
            }
        finally:
            process.terminate()
            process.wait(30)
    results["seconds"] = round(time.perf_counter() - start, 1)
    path = write_results("client", results)
    print(f"{results['seconds']} s; results in {path}")


if __name__ == "__main__":
    main()
