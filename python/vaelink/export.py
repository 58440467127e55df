"""Export a diffusers VAE to ONNX: an encoder graph (image -> posterior moments, or latents for tiny
autoencoders) and a decoder graph (latent -> image), with dynamic batch, height and width.

Needs torch, diffusers and onnx (`pip install 'vaelink[export]'`); running the exports never does.
Variants: `float32`; `float16` (converted graph, float16 inputs and outputs); `float16-cuda`
(ONNX Runtime's stable-diffusion fusions - GroupNorm, NhwcConv, attention - for the CUDA provider)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cards import ModelCard, get_card
from .errors import VaelinkError
from .export_segments import export_segments, has_segments
from .exports import MANIFEST, Manifest, export_dir, read_manifest, sha256_file

__all__ = ["VARIANTS", "export_model", "export_vae"]

VARIANTS = ("float32", "float16", "float16-cuda")
OPSET = 17


def _require_torch() -> Any:
    try:
        import diffusers  # noqa: F401
        import onnx  # noqa: F401
        import torch
    except ImportError as e:
        raise VaelinkError(
            f"exporting needs torch, diffusers and onnx ({e.name} is missing): "
            "pip install 'vaelink[export]'"
        ) from None
    return torch


def _graphs(vae: Any) -> tuple[Any, Any]:
    """The encoder and decoder of a diffusers VAE as modules with one input and one output."""
    torch: Any = _require_torch()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, image: Any) -> Any:
            h = self.vae.encoder(image)
            quant_conv = getattr(self.vae, "quant_conv", None)
            return quant_conv(h) if quant_conv is not None else h

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent: Any) -> Any:
            post_quant_conv = getattr(self.vae, "post_quant_conv", None)
            z = post_quant_conv(latent) if post_quant_conv is not None else latent
            return self.vae.decoder(z)

    return Encoder().eval(), Decoder().eval()


def _export_graph(module: Any, example: Any, path: Path, input_name: str, output_name: str) -> None:
    import warnings

    torch = _require_torch()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter (the dynamo one fails on AutoencoderKL's data-dependent branches);
        # its deprecation and tracer warnings are expected here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: axes, output_name: axes},
        )


def _to_float16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(convert_float_to_float16(onnx.load(str(src)), keep_io_types=False))
    # The converter appends the Casts it inserts (around Resize's scales) after their consumers:
    # ONNX Runtime copes, the ONNX checker and other runtimes want the nodes in topological order.
    model.save_model_to_file(str(dst))


def _optimize_for_cuda(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        str(src),
        model_type="vae",
        opt_level=0,
        optimization_options=FusionOptions("vae"),
        use_gpu=True,
    )
    optimized.convert_float_to_float16(keep_io_types=False)
    # Sorts the nodes and declares the com.microsoft opset the fused nodes use (onnx.save does not).
    optimized.save_model_to_file(str(dst))


def _memory_config(vae: Any, card: ModelCard) -> dict[str, Any]:
    """What the engine's memory model needs: the widest full-resolution block and the attention."""
    config = dict(vae.config)
    widths = config.get("block_out_channels") or config.get("encoder_block_out_channels") or [128]
    attention = card.has_posterior and bool(config.get("mid_block_add_attention", True))
    return {"full_res_channels": int(widths[0]), "attention": attention}


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("vaelink", "torch", "diffusers", "onnx", "onnxruntime"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


def export_vae(
    vae: Any,
    card: ModelCard,
    output: Path,
    *,
    variants: Sequence[str] = ("float32", "float16"),
    source: dict[str, Any] | None = None,
) -> Path:
    """Exports an already-loaded diffusers VAE module described by `card` into `output`.

    Files are written to a temporary folder and moved into place only when all of them exist, so
    an interrupted export never leaves a folder that looks complete."""
    torch = _require_torch()
    unknown = set(variants) - set(VARIANTS)
    if unknown or "float32" not in variants:
        raise VaelinkError(f"variants must include float32 and be among {VARIANTS}, got {variants}")
    vae = vae.to(torch.float32).eval()
    encoder, decoder = _graphs(vae)
    f = card.spatial_factor
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache's exports from other users
    try:
        parts = {
            "encoder": (encoder, torch.zeros(1, 3, 8 * f, 8 * f), "image", "moments"),
            "decoder": (decoder, torch.zeros(1, card.latent_channels, 8, 8), "latent", "image"),
        }
        for part, (module, example, inp, out) in parts.items():
            _export_graph(module, example, work / f"{part}-float32.onnx", inp, out)
            if "float16" in variants:
                _to_float16(work / f"{part}-float32.onnx", work / f"{part}-float16.onnx")
            if "float16-cuda" in variants:
                _optimize_for_cuda(
                    work / f"{part}-float32.onnx", work / f"{part}-float16-cuda.onnx"
                )
        files = {
            variant: {
                part: {
                    "file": f"{part}-{variant}.onnx",
                    "bytes": (work / f"{part}-{variant}.onnx").stat().st_size,
                    "sha256": sha256_file(work / f"{part}-{variant}.onnx"),
                }
                for part in parts
            }
            for variant in variants
        }
        # Exact tiling's segments: only models that normalise need them.
        segments, fused = export_segments(vae, work) if has_segments(vae) else ({}, {})
        record = {**(source or {}), "config": _memory_config(vae, card)}
        manifest = Manifest(
            card=card,
            variants=files,
            source=record,
            exporter=_versions(),
            segments=segments,
            fused=fused,
        )
        (work / MANIFEST).write_text(manifest.to_json())
        if output.exists():
            shutil.rmtree(output)
        work.rename(output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    read_manifest(output)
    return output


def _load_diffusers_vae(card: ModelCard, source: str | None, revision: str | None) -> Any:
    _require_torch()
    import diffusers

    cls = getattr(diffusers, card.architecture)
    location = source or card.repo
    if location is None:
        raise VaelinkError(f"model {card.name!r} names no weights; pass a source")
    path = Path(location)
    if path.is_file():
        return cls.from_single_file(str(path))
    kwargs: dict[str, Any] = {"revision": revision or card.revision}
    if card.subfolder and not path.is_dir():
        kwargs["subfolder"] = card.subfolder
    return cls.from_pretrained(location, **kwargs)


def export_model(
    name: str,
    *,
    source: str | None = None,
    revision: str | None = None,
    output: Path | None = None,
    variants: Sequence[str] = ("float32", "float16"),
) -> Path:
    """Exports the model `name` (a card) from its hub repo, or from `source`: another repo id, a local
    diffusers folder or a single-file checkpoint. Returns the export folder."""
    card = get_card(name)
    vae = _load_diffusers_vae(card, source, revision)
    record = {"location": source or card.repo, "subfolder": card.subfolder, "revision": revision}
    return export_vae(vae, card, output or export_dir(name), variants=variants, source=record)
