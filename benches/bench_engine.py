"""The local engine against diffusers' eager forward pass, same weights and inputs, same run.

    python benches/bench_engine.py                       # CPU: medium and real SD configs
    python benches/bench_engine.py --device cuda         # GPU: real SD architecture, 512-2048
    python benches/bench_engine.py --plan medium:64,128  # the same run, other configs and sizes

Weights are seeded random at the real SD-family architecture (128/256/512/512, 4 latent channels);
speed does not depend on the weights' values. Results: benches/results/engine-<device>-<machine>.json.
On CUDA it also records peak memory and a tiled 4096 x 4096 decode.

Before timing anything it checks the answers (and exits 1 if one is wrong, after writing the JSON):
the sessions' providers are the device's; torch tensors through IO binding (untiled, exact- and
blended-tiled) equal the numpy path; the engine matches diffusers on the same weights and inputs;
exact tiling matches untiled. It records each size's first-call latency on a fresh engine (cuDNN's
algorithm search, per cuDNN search mode on CUDA) besides the medians. `--plan medium:64` on the
CPU rehearses the whole GPU script in a minute.

    python benches/bench_engine.py --exact sd:1024:512   # exact tiling vs untiled, CONFIG:SIZE:TILE

Exact tiling (`vaelink.exact`) against the untiled engine on the same engine and inputs: A/B runs
interleaved (so drift from other load hits both), medians, time per pixel and the largest relative
difference; and each one's difference from diffusers' own untiled pass on the same weights, in
float32 and in float64 (the float64 decode only up to 512 pixels: at 1024 it needs over 24 GiB).
Results: benches/results/engine-exact-<device>-<machine>.json.

    python benches/bench_engine.py --tiling medium:1024:512 --reps 3   # every tiling mode
    python benches/bench_engine.py --tiling medium:1024:512 \
        --tiling medium:2048:512:exact+fast+blended+diffusers_tiled   # modes named, first the reference

Untiled, exact-, fast- and blended-tiled vaelink and diffusers' `vae.enable_tiling()` (same weights,
torch on the CPU with ONNX Runtime's thread count), encode and decode, repetitions interleaved
(A, B, C, ... rotated each round), medians, time per pixel and its ratio to untiled, each mode's
error against untiled (largest difference / largest magnitude; PSNR of the uint8 decode), and the
peak memory of one call in a fresh subprocess per mode (VmHWM after resetting it, less VmRSS before
the call). The first mode is the reference of times and errors (untiled by default: its attention
is ONNX Runtime's flash attention, so a 2048 x 2048 image runs untiled in 24 GiB).
Results: benches/results/engine-tiling-<machine>.json.

    python benches/bench_engine.py --peak medium:4096:512:decode:exact   # CONFIG:SIZE:TILE:PART:MODE

One call in a fresh process: its time and peak memory (VmHWM growth, as above), for sizes too
slow to repeat. Results: benches/results/engine-peak-cpu-<machine>.json.

    python benches/bench_engine.py --precision sd:256,512 --reps 5   # bfloat16 on the CPU

The CPU engine in bfloat16 (OpenVINO, where the CPU has native bfloat16) against itself in float32
(ONNX Runtime) and diffusers' float32, interleaved, on a photo; bfloat16's PSNR against float32
for encode and decode. Results: benches/results/engine-precision-cpu-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_ms, median_seconds, photo, psnr, write_results

CONFIGS = {
    # The SD1.x/SDXL/SD3/FLUX.1 body (4 latent channels as in SD1.x/SDXL).
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    # A quarter-width model of the same shape, so the CPU run finishes in minutes.
    "medium": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32),
}


def build_vae(config: str) -> Any:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        **CONFIGS[config],
    ).eval()


def measure(config: str, sizes: list[int], device: str, folder: Path) -> dict[str, Any]:
    import torch

    from vaelink.cards import get_card
    from vaelink.engine import Engine
    from vaelink.export import export_vae

    card = get_card("sd15")
    vae = build_vae(config)
    variants = ("float32", "float16", "float16-cuda") if device == "cuda" else ("float32",)
    t0 = time.perf_counter()
    export = export_vae(vae, card, folder / config, variants=variants)
    export_s = time.perf_counter() - t0
    dtype = torch.float16 if device == "cuda" else torch.float32
    vae = vae.to(device=device, dtype=dtype)
    rows: dict[str, Any] = {"export_seconds": export_s}
    rows["first_call_ms"] = {str(size): first_calls(export, device, size) for size in sizes}
    # float32 on the CPU: `--precision` compares bfloat16 with it.
    engine = Engine(export, provider="cuda") if device == "cuda" else cpu_engine(export, "float32")
    runs = 3 if device == "cpu" else 10
    rows["checks"] = {str(size): check_answers(engine, vae, export, size) for size in sizes}
    for size in sizes:
        rng = np.random.default_rng(size)
        image = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        latents = rng.standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)
        x = torch.from_numpy(2 * image.astype(np.float32) / 255 - 1).permute(0, 3, 1, 2)
        x = x.to(device, dtype)
        z = torch.from_numpy(latents / card.scaling_factor).to(device, dtype)

        def sync() -> None:
            if device == "cuda":
                torch.cuda.synchronize()

        def diffusers_encode(x: Any = x) -> None:
            with torch.no_grad():
                vae.encode(x).latent_dist.mean.cpu()
            sync()

        def diffusers_decode(z: Any = z) -> None:
            with torch.no_grad():
                vae.decode(z).sample.cpu()
            sync()

        def vaelink_encode(image: np.ndarray = image) -> None:
            engine.encode(image, tile=False)

        def vaelink_decode(latents: np.ndarray = latents) -> None:
            engine.decode(latents, output="float", tile=False)

        def ms(fn: Any) -> float:
            return 1e3 * median_seconds(fn, min_runs=runs, min_time=0)

        row = {
            "diffusers_encode_ms": ms(diffusers_encode),
            "vaelink_encode_ms": ms(vaelink_encode),
            "diffusers_decode_ms": ms(diffusers_decode),
            "vaelink_decode_ms": ms(vaelink_decode),
        }
        if device == "cuda":
            row.update(cuda_memory(vae, z, export, latents))
        row["encode_speedup"] = row["diffusers_encode_ms"] / row["vaelink_encode_ms"]
        row["decode_speedup"] = row["diffusers_decode_ms"] / row["vaelink_decode_ms"]
        print(config, size, {k: round(v, 2) for k, v in row.items()}, flush=True)
        rows[str(size)] = row
    return rows


def cpu_engine(export: Path, dtype: str) -> Any:
    from vaelink.engine import Engine

    return Engine(export, provider="cpu", dtype=dtype)  # type: ignore[arg-type]


def precision(config: str, sizes: list[int], folder: Path, reps: int) -> dict[str, Any]:
    """The CPU engine in bfloat16 (OpenVINO) against itself in float32 (ONNX Runtime) and
    diffusers in float32, interleaved; quality as PSNR of bfloat16 against float32, on a photo
    (encode) and on the float32 encoder's latents of it (decode)."""
    import torch

    from vaelink.cards import get_card
    from vaelink.export import export_vae

    card = get_card("sd15")
    vae = build_vae(config)
    export = export_vae(vae, card, folder / config, variants=("float32",))
    engines = {dtype: cpu_engine(export, dtype) for dtype in ("float32", "bfloat16")}
    rows: dict[str, Any] = {"runtimes": engines["bfloat16"].execution_providers}
    for size in sizes:
        image = photo(size)[None]
        latents = engines["float32"].encode(image, tile=False)
        x = torch.from_numpy(2 * image.astype(np.float32) / 255 - 1).permute(0, 3, 1, 2)
        z = torch.from_numpy(latents / card.scaling_factor)
        row: dict[str, Any] = {}
        for part, args in (("encode", image), ("decode", latents)):
            floats = {"output": "float"} if part == "decode" else {}
            ours = {d: getattr(e, part)(args, tile=False, **floats) for d, e in engines.items()}
            row[f"{part}_psnr_bf16_vs_f32_db"] = psnr(ours["bfloat16"], ours["float32"], None)

            def diffusers(part: str = part, x: Any = x, z: Any = z) -> Any:
                with torch.no_grad():
                    return vae.encode(x).latent_dist.mean if part == "encode" else vae.decode(z)

            calls = {
                f"vaelink_{dtype}": (
                    lambda e=e, part=part, args=args: getattr(e, part)(args, tile=False)
                )
                for dtype, e in engines.items()
            }
            calls["diffusers_float32"] = diffusers
            times = interleaved_ms(calls, rounds=reps)
            row.update({f"{part}_{name}_ms": ms for name, ms in times.items()})
            row[f"{part}_bf16_speedup_vs_f32"] = (
                times["vaelink_float32"] / times["vaelink_bfloat16"]
            )
        print(config, size, {k: round(v, 2) for k, v in row.items()}, flush=True)
        rows[str(size)] = row
    return rows


# Largest difference relative to the reference's largest magnitude, per comparison and dtype.
TOLERANCE = {
    "float32": {"same_session": 1e-5, "diffusers": 1e-3, "exact_vs_untiled": 1e-4},
    "float16": {"same_session": 5e-3, "diffusers": 3e-2, "exact_vs_untiled": 3e-2},
}
failures: list[str] = []


def rel(a: Any, b: Any) -> float:
    a, b = (np.asarray(v.float().cpu() if hasattr(v, "cpu") else v, np.float64) for v in (a, b))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def check_answers(engine: Any, vae: Any, export: Path, size: int) -> dict[str, Any]:
    """The engine's answers at `size` against the numpy path, diffusers and untiled; a wrong one is
    recorded in `failures` (the run exits 1 once its JSON is written)."""
    import torch

    from vaelink.engine import Engine

    device = "cuda" if engine.provider == "cuda" else "cpu"
    expected = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = engine._session("decoder", engine.dtype)
    providers = list(session.get_providers())
    row: dict[str, Any] = {"providers": providers, "dtype": engine.dtype}
    if providers[:1] != expected:
        failures.append(f"{size}: the session runs on {providers}, not {expected}")
    scale = engine.card.scaling_factor
    rng = np.random.default_rng(1000 + size)
    image = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    latents = rng.standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)
    x = torch.from_numpy(2 * image.astype(np.float32) / 255 - 1).permute(0, 3, 1, 2).to(device)
    z = torch.from_numpy(latents).to(device)
    with torch.no_grad():
        theirs_z = vae.encode(x.to(vae.dtype)).latent_dist.mean.float().cpu().numpy() * scale
        theirs_image = vae.decode((z / scale).to(vae.dtype)).sample.float().cpu().numpy()
    tiled = Engine(export, provider=engine.provider, tile_size=max(16, size // 2))
    answers = {
        "encode": {
            "numpy": engine.encode(image, tile=False),
            "torch": engine.encode(x, tile=False),
            "diffusers": theirs_z,
            "exact numpy": tiled.encode(image, tile=True, tiling="exact"),
            "exact torch": tiled.encode(x, tile=True, tiling="exact"),
            "blended numpy": tiled.encode(image, tile=True, tiling="blended"),
            "blended torch": tiled.encode(x, tile=True, tiling="blended"),
        },
        "decode": {
            "numpy": engine.decode(latents, output="float", tile=False),
            "torch": engine.decode(z, output="float", tile=False),
            "diffusers": theirs_image,
            "exact numpy": tiled.decode(latents, output="float", tile=True, tiling="exact"),
            "exact torch": tiled.decode(z, output="float", tile=True, tiling="exact"),
            "blended numpy": tiled.decode(latents, output="float", tile=True, tiling="blended"),
            "blended torch": tiled.decode(z, output="float", tile=True, tiling="blended"),
        },
    }
    tolerance = TOLERANCE[engine.dtype]
    for part, a in answers.items():
        for kind in ("torch", "exact torch", "blended torch"):
            if str(a[kind].device) != str(x.device):
                failures.append(f"{size} {part}: {kind} answered on {a[kind].device}")
        comparisons = {
            "torch vs numpy": (a["torch"], a["numpy"], "same_session"),
            "exact torch vs numpy": (a["exact torch"], a["exact numpy"], "same_session"),
            "blended torch vs numpy": (a["blended torch"], a["blended numpy"], "same_session"),
            "vs diffusers": (a["numpy"], a["diffusers"], "diffusers"),
            "exact vs untiled": (a["exact numpy"], a["numpy"], "exact_vs_untiled"),
        }
        for name, (ours, reference, kind) in comparisons.items():
            error = rel(ours, reference)
            row[f"{part} {name}"] = error
            if not error <= tolerance[kind]:  # NaN fails too
                failures.append(f"{size} {part} {name}: {error:.2e} > {tolerance[kind]:.0e}")
    print("checks", size, {k: v for k, v in row.items()}, flush=True)
    return row


def first_calls(export: Path, device: str, size: int) -> dict[str, float]:
    """A fresh engine's first encode and decode at `size` (loading, then on CUDA cuDNN's search for
    the new shape), per cuDNN search mode on CUDA: what a request meets without a warm-up."""
    from vaelink.engine import Engine

    rng = np.random.default_rng(size)
    image = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    latents = rng.standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)
    searches = ("exhaustive", "heuristic") if device == "cuda" else ("exhaustive",)
    row = {}
    for search in searches:
        engine = Engine(export, provider=device, cudnn_search=search)  # type: ignore[arg-type]
        for part, call in (
            ("decode", lambda e=engine: e.decode(latents, output="float", tile=False)),
            ("encode", lambda e=engine: e.encode(image, tile=False)),
        ):
            t0 = time.perf_counter()
            call()
            row[f"{part}_{search}"] = 1e3 * (time.perf_counter() - t0)
    print("first call ms", size, {k: round(v, 1) for k, v in row.items()}, flush=True)
    return row


def device_used_bytes() -> int:
    """GPU memory in use on device 0, as the driver sees it (ONNX Runtime's arena included)."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used


def cuda_memory(vae: Any, z: Any, export: Path, latents: np.ndarray) -> dict[str, float]:
    """Peak extra memory of one decode: torch's allocator peak for diffusers; for vaelink the growth
    of device memory across a fresh engine's first decode (its arena grows only as requested)."""
    import torch

    from vaelink.engine import Engine

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        vae.decode(z)
    torch.cuda.synchronize()
    diffusers_peak = torch.cuda.max_memory_allocated() - base
    before = device_used_bytes()
    Engine(export, provider="cuda").decode(latents, output="float", tile=False)
    vaelink_peak = device_used_bytes() - before
    return {
        "diffusers_decode_peak_gib": diffusers_peak / 2**30,
        "vaelink_decode_peak_gib": vaelink_peak / 2**30,
    }


def tiled_decode(folder: Path, size: int, reference_size: int) -> dict[str, float]:
    """A tiled decode of `size` x `size` on a fresh engine: time per pixel against an untiled
    `reference_size` decode, and the device memory it added."""
    from vaelink.engine import Engine

    rng = np.random.default_rng(0)
    big = rng.standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)
    small = rng.standard_normal((1, 4, reference_size // 8, reference_size // 8), dtype=np.float32)
    before = device_used_bytes()
    engine = Engine(folder / "sd", provider="cuda")
    tiled_s = median_seconds(
        lambda: engine.decode(big, output="float", tile=True), min_runs=3, min_time=0
    )
    added = device_used_bytes() - before
    untiled_s = median_seconds(
        lambda: engine.decode(small, output="float", tile=False), min_runs=3, min_time=0
    )
    per_pixel = (tiled_s / size**2) / (untiled_s / reference_size**2)
    return {
        "size": size,
        "tiled_ms": 1e3 * tiled_s,
        "extra_gib": added / 2**30,
        "time_per_pixel_vs_untiled": per_pixel,
    }


def exact_tiling(config: str, size: int, tile: int, folder: Path, reps: int) -> dict[str, Any]:
    """Exact-tiled vs untiled encode and decode, interleaved A/B repetitions, medians; each one's
    largest difference from diffusers' untiled pass on the same weights, in float32 and float64."""
    import statistics

    import torch

    from vaelink.cards import get_card
    from vaelink.engine import Engine
    from vaelink.export import export_vae

    vae, card = build_vae(config), get_card("sd15")
    export = export_vae(vae, card, folder / config, variants=("float32",))
    engine = Engine(export, provider="cpu", tile_size=tile)
    rng = np.random.default_rng(size)
    image = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    latents = rng.standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)
    row: dict[str, Any] = {"config": config, "size": size, "tile": tile, "reps": reps}
    # References on the same weights: diffusers' own untiled pass in float32, and in float64
    # (the truth, up to 1e-15; a float64 decode above 512 pixels does not fit in 24 GiB).
    references: dict[str, dict[str, np.ndarray]] = {"diffusers": {}, "float64": {}}
    x = torch.from_numpy(2 * image.astype(np.float64) / 255 - 1).permute(0, 3, 1, 2)
    z = torch.from_numpy(latents.astype(np.float64) / card.scaling_factor)
    with torch.no_grad():
        for name, dtype in (("diffusers", torch.float32), ("float64", torch.float64)):
            model = vae.to(dtype)
            mean = model.encode(x.to(dtype)).latent_dist.mean
            references[name]["encode"] = mean.double().numpy() * card.scaling_factor
            if dtype == torch.float32 or size <= 512:
                references[name]["decode"] = model.decode(z.to(dtype)).sample.double().numpy()
        vae.to(torch.float32)
    for part, run in (
        ("encode", lambda **kw: engine.encode(image, **kw)),
        ("decode", lambda **kw: engine.decode(latents, output="float", **kw)),
    ):
        times: dict[str, list[float]] = {"untiled": [], "exact": []}
        kwargs = {"untiled": {"tile": False}, "exact": {"tile": True, "tiling": "exact"}}
        results = {mode: run(**kw) for mode, kw in kwargs.items()}  # warm-up, and the outputs
        for i in range(reps):
            order = ["untiled", "exact"] if i % 2 == 0 else ["exact", "untiled"]
            for mode in order:
                t0 = time.perf_counter()
                run(**kwargs[mode])
                times[mode].append(time.perf_counter() - t0)
        untiled, exact = (statistics.median(times[m]) for m in ("untiled", "exact"))
        diff = np.abs(results["exact"] - results["untiled"]).max()
        row[part] = {
            "untiled_s": untiled,
            "exact_s": exact,
            "exact_vs_untiled_time": exact / untiled,
            "max_abs_diff_rel": float(diff / np.abs(results["untiled"]).max()),
        }
        for name, ref in references.items():
            if part in ref:
                for mode in ("untiled", "exact"):
                    row[part][f"{mode}_vs_{name}"] = rel(results[mode], ref[part])
        if "float64" in references and part in references["float64"]:
            row[part]["diffusers_vs_float64"] = rel(
                references["diffusers"][part], references["float64"][part]
            )
        print(config, size, tile, part, row[part], flush=True)
    return row


TILING_MODES = ("untiled", "exact", "fast", "blended", "diffusers_tiled")


def tiling_setup(config: str, size: int, tile: int, folder: Path, mode: str) -> Any:
    """The callables for `mode`'s encode and decode (inputs seeded by `size`) and the export."""
    import torch

    from vaelink.cards import get_card
    from vaelink.engine import Engine
    from vaelink.export import export_vae

    card = get_card("sd15")
    export = folder / config
    if not (export / "manifest.json").exists():
        export = export_vae(build_vae(config), card, export, variants=("float32",))
    rng = np.random.default_rng(size)
    image = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    latents = rng.standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)
    if mode == "diffusers_tiled":
        torch.set_num_threads(os.cpu_count() or 1)
        vae = build_vae(config)
        vae.enable_tiling()
        # The same tiles as vaelink's: `tile` pixels, a quarter overlap (diffusers' default).
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // 8
        x = torch.from_numpy(2 * image.astype(np.float32) / 255 - 1).permute(0, 3, 1, 2)
        z = torch.from_numpy(latents / card.scaling_factor)

        def encode() -> np.ndarray:
            with torch.no_grad():
                return vae.encode(x).latent_dist.mean.numpy() * card.scaling_factor

        def decode() -> np.ndarray:
            with torch.no_grad():
                return vae.decode(z).sample.numpy()

        return encode, decode
    engine = Engine(export, provider="cpu", tile_size=tile)
    kw: dict[str, Any] = {"tile": False} if mode == "untiled" else {"tile": True, "tiling": mode}
    return (
        lambda: engine.encode(image, **kw),
        lambda: engine.decode(latents, output="float", **kw),
    )


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(spec: str, folder: Path) -> None:
    """One call of one mode and part after loading: peak RSS growth (printed as JSON)."""
    config, size, tile, part, mode = spec.split(":")
    encode, decode = tiling_setup(config, int(size), int(tile), folder, mode)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = status_kib("VmRSS")
    t0 = time.perf_counter()
    (encode if part == "encode" else decode)()
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    print(
        json.dumps(
            {
                "rss_before_mib": before / 1024,
                "peak_growth_mib": (peak - before) / 1024,
                "seconds": seconds,
            }
        )
    )


def peak_memory(spec: str, folder: Path) -> dict[str, float]:
    """`memory_child` in a fresh process: one call's peak RSS growth and its time."""
    child = subprocess.run(
        [sys.executable, __file__, "--memory-child", spec, "--folder", str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def uint8(x: np.ndarray) -> np.ndarray:
    return ((x / 2 + 0.5).clip(0, 1) * 255).round().astype(np.uint8)


def tiling_modes(
    config: str, size: int, tile: int, folder: Path, reps: int, modes: tuple[str, ...]
) -> dict[str, Any]:
    """`modes` vs the first of them (untiled by default), encode and decode, rotated interleaved
    repetitions, medians."""
    import statistics

    import torch

    calls = {m: tiling_setup(config, size, tile, folder, m) for m in modes}
    row: dict[str, Any] = {
        "config": config,
        "size": size,
        "tile": tile,
        "reps": reps,
        "reference": modes[0],
        "torch_threads": torch.get_num_threads(),
    }
    for index, part in enumerate(("encode", "decode")):
        t0 = time.perf_counter()
        outputs = {m: calls[m][index]() for m in modes}  # warm-up, and the outputs
        print(part, "warm-up", round(time.perf_counter() - t0, 1), "s", flush=True)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(reps):
            order = modes[i % len(modes) :] + modes[: i % len(modes)]
            for mode in order:
                t0 = time.perf_counter()
                calls[mode][index]()
                times[mode].append(time.perf_counter() - t0)
        ref = outputs[modes[0]]
        ref_s = statistics.median(times[modes[0]])
        result: dict[str, Any] = {}
        for mode in modes:
            seconds = statistics.median(times[mode])
            out = outputs[mode]
            entry = {
                "seconds": seconds,
                "all_seconds": times[mode],
                "ns_per_pixel": 1e9 * seconds / size**2,
                "time_vs_reference": seconds / ref_s,
                "max_abs_diff_rel": float(np.abs(out - ref).max() / np.abs(ref).max()),
            }
            if part == "decode":
                db = psnr(uint8(out), uint8(ref))
                entry["psnr_uint8_db"] = db if np.isfinite(db) else None  # None: identical
                entry["max_uint8_diff"] = int(
                    np.abs(uint8(out).astype(int) - uint8(ref).astype(int)).max()
                )
            result[mode] = entry
            print(
                config,
                size,
                tile,
                part,
                mode,
                {k: v for k, v in entry.items() if k != "all_seconds"},
                flush=True,
            )
        for mode in modes:
            peak = peak_memory(f"{config}:{size}:{tile}:{part}:{mode}", folder)
            peak.pop("seconds")  # one cold call: the interleaved medians above are the times
            result[mode].update(peak)
            print(part, mode, "peak growth MiB", round(result[mode]["peak_growth_mib"]), flush=True)
        row[part] = result
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--exact", metavar="CONFIG:SIZE:TILE", action="append")
    parser.add_argument("--tiling", metavar="CONFIG:SIZE:TILE[:MODE+MODE...]", action="append")
    parser.add_argument(
        "--precision", metavar="CONFIG:SIZE,SIZE", help="bfloat16 against float32 on the CPU"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--plan", metavar="CONFIG:SIZE,SIZE", action="append", help="configs and sizes to run"
    )
    parser.add_argument(
        "--peak",
        metavar="CONFIG:SIZE:TILE:PART:MODE",
        action="append",
        help="one call in a fresh process: peak memory and time (medium:4096:512:decode:exact)",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, Path(args.folder))
        return
    if args.peak:
        with tempfile.TemporaryDirectory() as tmp:
            peaks = [{"spec": spec, **peak_memory(spec, Path(tmp))} for spec in args.peak]
        print(f"wrote {write_results('engine-peak-cpu', {'device': 'cpu', 'peak': peaks})}")
        return
    if args.precision:
        config, sizes = args.precision.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            rows = precision(config, [int(s) for s in sizes.split(",")], Path(tmp), args.reps)
        print(f"wrote {write_results('engine-precision-cpu', {'device': 'cpu', config: rows})}")
        return
    if args.tiling:
        results: dict[str, Any] = {"device": "cpu", "tiling": []}
        with tempfile.TemporaryDirectory() as tmp:
            for spec in args.tiling:
                config, size, tile, *named = spec.split(":")
                modes = tuple(named[0].split("+")) if named else TILING_MODES
                row = tiling_modes(config, int(size), int(tile), Path(tmp), args.reps, modes)
                results["tiling"].append(row)
                path = write_results("engine-tiling", results)  # after each size, in case
        print(f"wrote {path}")
        return
    if args.exact:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for spec in args.exact:
                config, size, tile = spec.split(":")
                rows.append(exact_tiling(config, int(size), int(tile), Path(tmp), args.reps))
        print(f"wrote {write_results('engine-exact-cpu', {'device': 'cpu', 'exact': rows})}")
        return
    if args.plan:
        plan = {
            c: [int(s) for s in sizes.split(",")] for c, sizes in (p.split(":") for p in args.plan)
        }
    elif args.device == "cuda":
        plan = {"sd": [512, 1024, 2048]}
    else:
        plan = {"medium": [256, 512], "sd": [256]}
    results = {"device": args.device}
    with tempfile.TemporaryDirectory() as tmp:
        for config, sizes in plan.items():
            results[config] = measure(config, sizes, args.device, Path(tmp))
        if args.device == "cuda" and not args.plan:
            results["tiled_4096_decode"] = tiled_decode(Path(tmp), 4096, 2048)
            print(results["tiled_4096_decode"])
    results["failures"] = failures
    path = write_results(f"engine-{args.device}", results)
    print(f"wrote {path}")
    if failures:
        print("WRONG ANSWERS:", *failures, sep="\n  ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
