"""`vaelink.dataset.encode_dataset` against the loop a trainer writes to cache latents today.

    python benches/bench_dataset.py [--images 16] [--resolution 256] [--reps 3]
    # writes benches/results/dataset-<machine>.json
    python benches/bench_dataset.py --model kl-small [--images 12] [--reps 3]
    # the same against diffusers' AutoencoderKL in torch: the "kl_small" key of the same file
    python benches/bench_dataset.py --ray [--images 12] [--reps 2]
    # the local run against Ray Data on a local cluster: the "ray" key of the same file

Both encode the same JPEG photos (scikit-image's, resampled to camera-like sizes) with the same
model (the bundled `vaelink-tiny`) into the same buckets:

- the trainer's loop: per image, Pillow decode, resize to cover the bucket and centre-crop, encode
  one image at a time, `np.save` one `.npy` file per image. Its encoder is vaelink's engine
  (`Engine.encode`), not diffusers' `AutoencoderTiny`: no torch weights of the bundled model ship
  (only its ONNX export), so the loop's model time is vaelink's and only the pipeline differs;
- `encode_dataset`: decode and resize in threads while the engine encodes batches of one bucket,
  Parquet shards.

`--model kl-small`: the trainer's loop as trainers run it - diffusers' `AutoencoderKL` in torch
(`models/kl-small`, `latent_dist.mean * scaling_factor`, torch on every core) - against
`encode_dataset` on the ONNX export of the same weights.

Repetitions interleave the two; each starts from an empty output folder. Medians are reported.

`--ray`: `encode_dataset` against `encode_dataset(ray=True)` on a local Ray cluster of every CPU
(started once, before the repetitions; each Ray run starts its actor and loads the model, as a
real run does)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import pillow_jpeg, write_results

from vaelink.dataset import BucketSpec, encode_dataset
from vaelink.dataset.buckets import place
from vaelink.engine import Engine

SIZES = ((1536, 1024), (1024, 1536), (1280, 960), (1024, 1024), (1600, 900), (960, 1280))


def make_photos(folder: Path, count: int) -> list[Path]:
    from PIL import Image
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    paths = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        image = Image.fromarray(sources[i % len(sources)]).resize((width, height), Image.LANCZOS)
        path = folder / f"{i:04d}.jpg"
        path.write_bytes(pillow_jpeg(np.asarray(image), quality=90))
        paths.append(path)
    return paths


def diffusers_encoder(folder: Path) -> Callable[[np.ndarray], np.ndarray]:
    """One `(H, W, 3)` uint8 image -> scaled posterior-mean latents, by diffusers in torch."""
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(os.cpu_count() or 1)
    vae = AutoencoderKL.from_pretrained(folder).eval()
    factor = vae.config.scaling_factor

    def encode(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            return (vae.encode(x).latent_dist.mean * factor)[0].numpy()

    return encode


def trainer_loop(
    paths: list[Path], out: Path, encode: Callable[[np.ndarray], np.ndarray], spec: BucketSpec
) -> None:
    from PIL import Image

    buckets = spec.buckets()
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        p = place(spec, buckets, *rgb.size)
        rh, rw = p.resized_size
        pixels = np.asarray(rgb.resize((rw, rh), Image.LANCZOS).crop(p.crop_box))
        latents = encode(pixels)
        np.save(out / f"{path.stem}.npy", latents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ray", action="store_true", help="the local run against Ray Data")
    parser.add_argument(
        "--model",
        choices=["vaelink-tiny", "kl-small"],
        default="vaelink-tiny",
        help="kl-small: the trainer's loop with diffusers' AutoencoderKL in torch",
    )
    args = parser.parse_args()
    if args.ray:
        return ray_main(args)
    spec = BucketSpec(args.resolution, 64)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, encode, encoder_name = trainer_model(args.model, root)
        (root / "src").mkdir()
        paths = make_photos(root / "src", args.images)
        times: dict[str, list[float]] = {"trainer_loop": [], "encode_dataset": []}
        trainer_loop(paths[:2], _fresh(root / "warm"), encode, spec)  # load the sessions
        for rep in range(args.reps):
            t0 = time.perf_counter()
            trainer_loop(paths, _fresh(root / "loop"), encode, spec)
            times["trainer_loop"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            report = encode_dataset(
                root / "src",
                _fresh(root / "cache"),
                model=model,
                resolution=args.resolution,
                step=64,
                batch_size=args.batch_size,
                progress=False,
            )
            times["encode_dataset"].append(time.perf_counter() - t0)
            assert report.rows == len(paths) and not report.skipped
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    rates = {k: len(paths) / statistics.median(v) for k, v in times.items()}
    results = {
        "setup": {
            "images": len(paths),
            "source_sizes": [list(s) for s in SIZES],
            "resolution": args.resolution,
            "step": 64,
            "batch_size": args.batch_size,
            "model": f"{args.model} (CPU)",
            "reps": args.reps,
            "trainer_loop_encoder": encoder_name,
        },
        "seconds": times,
        "images_per_second": {k: round(v, 2) for k, v in rates.items()},
        "speedup": round(rates["encode_dataset"] / rates["trainer_loop"], 2),
    }
    print(results["images_per_second"], "speedup", results["speedup"])
    if args.model == "kl-small":
        print(write_results("dataset", {"kl_small": results}, merge=True))
    else:
        print(write_results("dataset", results, merge=True))


def trainer_model(
    name: str, root: Path
) -> tuple[str | Path, Callable[[np.ndarray], np.ndarray], str]:
    """The model `encode_dataset` gets, the trainer loop's encoder, and what that encoder is."""
    if name == "vaelink-tiny":
        engine = Engine("vaelink-tiny")
        return (
            name,
            lambda pixels: engine.encode(pixels[None])[0],
            "vaelink Engine.encode, one image per call (no diffusers weights of the bundled model "
            "exist)",
        )
    import tomllib

    from diffusers import AutoencoderKL

    from vaelink.cards import ModelCard
    from vaelink.export import export_vae

    models = Path(__file__).resolve().parent.parent / "models"
    card = ModelCard.from_dict(tomllib.loads((models / "kl-small.toml").read_text()))
    vae = AutoencoderKL.from_pretrained(models / "kl-small")
    folder = export_vae(vae, card, root / "kl-small", variants=("float32",))
    return (
        folder,
        diffusers_encoder(models / "kl-small"),
        "diffusers AutoencoderKL in torch (models/kl-small), one image per call",
    )


def ray_main(args: argparse.Namespace) -> None:
    import ray

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        paths = make_photos(root / "src", args.images)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ["RAY_TMPDIR"] = str(root)
        t0 = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=str(root / "r"))
        started = time.perf_counter() - t0
        options = {"resolution": args.resolution, "step": 64, "batch_size": args.batch_size}
        times: dict[str, list[float]] = {"local": [], "ray": []}
        try:
            for rep in range(args.reps):
                for name, on_ray in (("local", False), ("ray", True)):
                    t0 = time.perf_counter()
                    report = encode_dataset(
                        root / "src", _fresh(root / name), ray=on_ray, progress=False, **options
                    )
                    times[name].append(time.perf_counter() - t0)
                    assert report.rows == len(paths) and not report.skipped
                print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
        finally:
            ray.shutdown()
    rates = {k: len(paths) / statistics.median(v) for k, v in times.items()}
    results = {
        "ray": {
            "setup": {
                "images": len(paths),
                "resolution": args.resolution,
                "batch_size": args.batch_size,
                "reps": args.reps,
                "cluster": f"local, {cpus} CPUs; one actor of {max(cpus - 1, 1)} CPUs",
                "ray": ray.__version__,
            },
            "cluster_start_seconds": round(started, 2),
            "seconds": times,
            "images_per_second": {k: round(v, 2) for k, v in rates.items()},
            "speedup": round(rates["ray"] / rates["local"], 2),
        }
    }
    print(results["ray"]["images_per_second"], "speedup", results["ray"]["speedup"])
    print(write_results("dataset", results, merge=True))


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


if __name__ == "__main__":
    main()
