"""`vaelink.dataset.encode_dataset` against the loop a trainer writes to cache latents today.

    python benches/bench_dataset.py [--images 16] [--resolution 256] [--reps 3]
    # writes benches/results/dataset-<machine>.json
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


def trainer_loop(paths: list[Path], out: Path, engine: Engine, spec: BucketSpec) -> None:
    from PIL import Image

    buckets = spec.buckets()
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        p = place(spec, buckets, *rgb.size)
        rh, rw = p.resized_size
        pixels = np.asarray(rgb.resize((rw, rh), Image.LANCZOS).crop(p.crop_box))
        latents = engine.encode(pixels[None])[0]
        np.save(out / f"{path.stem}.npy", latents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ray", action="store_true", help="the local run against Ray Data")
    args = parser.parse_args()
    if args.ray:
        return ray_main(args)
    spec = BucketSpec(args.resolution, 64)
    engine = Engine("vaelink-tiny")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        paths = make_photos(root / "src", args.images)
        times: dict[str, list[float]] = {"trainer_loop": [], "encode_dataset": []}
        trainer_loop(paths[:2], _fresh(root / "warm"), engine, spec)  # load the sessions
        for rep in range(args.reps):
            t0 = time.perf_counter()
            trainer_loop(paths, _fresh(root / "loop"), engine, spec)
            times["trainer_loop"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            report = encode_dataset(
                root / "src",
                _fresh(root / "cache"),
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
            "model": "vaelink-tiny (CPU)",
            "reps": args.reps,
            "trainer_loop_encoder": "vaelink Engine.encode, one image per call (no diffusers "
            "weights of the bundled model exist)",
        },
        "seconds": times,
        "images_per_second": {k: round(v, 2) for k, v in rates.items()},
        "speedup": round(rates["encode_dataset"] / rates["trainer_loop"], 2),
    }
    print(results["images_per_second"], "speedup", results["speedup"])
    print(write_results("dataset", results))


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
