"""Export a diffusers VAE to ONNX: an encoder graph (image -> posterior moments, or latents for tiny
autoencoders) and a decoder graph (latent -> image), with dynamic batch, height and width.

Needs torch, diffusers and onnx (`pip install 'vaelink[export]'`); running the exports never does.
Variants: `float32`; `float16` (converted graph, float16 inputs and outputs); `float16-cuda`
(ONNX Runtime's stable-diffusion fusions - GroupNorm, NhwcConv, attention - for the CUDA provider)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cards import (
    ModelCard,
    card_from_config,
    check_fits,
    fit_card,
    get_card,
    memory_config,
    read_config,
)
from .errors import UnknownModelError, VaelinkError, VaelinkWarning
from .export_segments import MS_DOMAIN, export_segments, has_segments
from .exports import (
    MANIFEST,
    Manifest,
    check_name,
    export_dir,
    file_entry,
    read_manifest,
    staged,
    versions,
)
from .runtime import RUNTIME_DISTRIBUTIONS, load_onnxruntime

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
    load_onnxruntime()  # the float16 and checking steps run ONNX Runtime: one sentence naming [cpu]/[gpu]
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


def _attention_processor() -> Any:
    """A diffusers attention processor for exporting: the mid-block's self-attention becomes ONNX
    Runtime's MultiHeadAttention (flash attention on the CPU, memory-efficient kernels on CUDA), so
    a large image's graph never holds its `(h*w)^2` scores (16 GiB at 2048 x 2048 in float32)."""
    torch = _require_torch()
    from diffusers.models.attention_processor import AttnProcessor2_0

    class MultiHeadAttention(torch.autograd.Function):  # type: ignore[name-defined]
        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any, heads: int) -> Any:
            b, tokens, channels = q.shape

            def split(t: Any) -> Any:
                return t.view(b, tokens, heads, channels // heads).transpose(1, 2)

            out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
            return out.transpose(1, 2).reshape(b, tokens, channels)

        @staticmethod
        def symbolic(g: Any, q: Any, k: Any, v: Any, heads: int) -> Any:
            # The scale is the op's default, 1/sqrt(head size): diffusers' processor passes none.
            out = g.op(f"{MS_DOMAIN}::MultiHeadAttention", q, k, v, num_heads_i=heads)
            out.setType(q.type())  # the output is shaped like q: later shapes stay inferred
            return out

    class Processor(AttnProcessor2_0):
        def __call__(
            self,
            attn: Any,
            hidden: Any,
            encoder_hidden_states: Any = None,
            attention_mask: Any = None,
            temb: Any = None,
            *args: Any,
            **kw: Any,
        ) -> Any:
            if not _plain_self_attention(attn, hidden, encoder_hidden_states, attention_mask):
                return super().__call__(
                    attn, hidden, encoder_hidden_states, attention_mask, temb, *args, **kw
                )
            b, c, h, w = hidden.shape
            x = attn.group_norm(hidden.view(b, c, h * w)).transpose(1, 2)  # [b, hw, c]
            out = MultiHeadAttention.apply(attn.to_q(x), attn.to_k(x), attn.to_v(x), attn.heads)
            out = attn.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
            return (out + hidden) / attn.rescale_output_factor

    return Processor()


def _plain_self_attention(attn: Any, hidden: Any, context: Any, mask: Any) -> bool:
    """The VAE mid-block's kind: self-attention over a 4-D map, group norm, residual, no extras."""
    return (
        hidden.ndim == 4
        and context is None
        and mask is None
        and attn.group_norm is not None
        and attn.residual_connection
        and attn.spatial_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
    )


@contextmanager
def _onnx_attention(vae: Any) -> Iterator[None]:
    """`vae`'s attention exported as MultiHeadAttention, its own processors restored after."""
    if not hasattr(vae, "attn_processors"):
        yield
        return
    saved = vae.attn_processors
    vae.set_attn_processor(_attention_processor())
    try:
        yield
    finally:
        vae.set_attn_processor(saved)


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
            custom_opsets={MS_DOMAIN: 1},
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
    check_fits(card, _module_config(vae), f"the {type(vae).__name__} given")  # before exporting
    vae = vae.to(torch.float32).eval()
    encoder, decoder = _graphs(vae)
    f = card.spatial_factor
    output = Path(output)
    with staged(output) as work:
        parts = {
            "encoder": (encoder, torch.zeros(1, 3, 8 * f, 8 * f), "image", "moments"),
            "decoder": (decoder, torch.zeros(1, card.latent_channels, 8, 8), "latent", "image"),
        }
        for part, (module, example, inp, out) in parts.items():
            with _onnx_attention(vae):
                _export_graph(module, example, work / f"{part}-float32.onnx", inp, out)
            if "float16" in variants:
                _to_float16(work / f"{part}-float32.onnx", work / f"{part}-float16.onnx")
            if "float16-cuda" in variants:
                _optimize_for_cuda(
                    work / f"{part}-float32.onnx", work / f"{part}-float16-cuda.onnx"
                )
        files = {
            variant: {part: file_entry(work, f"{part}-{variant}.onnx") for part in parts}
            for variant in variants
        }
        # Exact tiling's segments: only models that normalise need them.
        segments, fused = export_segments(vae, work) if has_segments(vae) else ({}, {})
        record = {**(source or {}), "config": memory_config(dict(vae.config), card)}
        manifest = Manifest(
            card=card,
            variants=files,
            source=record,
            exporter=versions("torch", "diffusers", "onnx", *RUNTIME_DISTRIBUTIONS),
            segments=segments,
            fused=fused,
        )
        (work / MANIFEST).write_text(manifest.to_json())
    read_manifest(output)
    return output


# What a diffusers VAE folder holds: its config and its weights (one file, shards, or a .bin).
CONFIG = "config.json"
WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model-*-of-*.safetensors",
)
LEGACY_WEIGHTS = ("diffusion_pytorch_model.bin",)


@dataclass
class _Source:
    """Where a VAE's files are on this machine: a diffusers folder (`config.json` and weights) or a
    single-file checkpoint, and the record of where they came from, for the manifest."""

    folder: Path | None
    checkpoint: Path | None
    record: dict[str, Any]

    def config(self) -> dict[str, Any] | None:
        """The folder's `config.json` as written (so that keys it lacks stay unknown)."""
        return None if self.folder is None else read_config(self.folder / CONFIG)


def _vae_folder(root: Path, subfolder: str | None) -> Path | None:
    """The folder under `root` with a VAE's config: `subfolder` if given, else the root itself
    (a VAE repo) or its `vae/` (a pipeline's)."""
    for folder in [root / subfolder] if subfolder else [root, root / "vae"]:
        if (folder / CONFIG).is_file():
            return folder
    return None


def _fetch(location: str, subfolder: str | None, revision: str | None) -> _Source:
    """A hub repo's VAE through the Hugging Face cache: its config first (so that a VAE that does
    not fit is refused before its weights are downloaded: `check`), then its weights."""
    from . import hub

    prefixes = [f"{subfolder}/"] if subfolder else ["", "vae/"]
    root = hub.download(location, [p + CONFIG for p in prefixes], revision=revision)
    folder = _vae_folder(root, subfolder)
    if folder is None:
        where = f"{subfolder}/{CONFIG}" if subfolder else f"{CONFIG} nor vae/{CONFIG}"
        raise VaelinkError(f"{location} has no {where}: not a diffusers VAE (or pass --subfolder)")
    record = {
        "location": location,
        "subfolder": folder.relative_to(root).as_posix() if folder != root else None,
        "revision": revision,
        "commit": root.name,  # the snapshot folder is named after the commit
    }
    return _Source(folder, None, record)


def _fetch_weights(source: _Source) -> None:
    from . import hub

    assert source.folder is not None
    prefix = f"{source.record['subfolder']}/" if source.record.get("subfolder") else ""
    for names in (WEIGHTS, LEGACY_WEIGHTS):
        root = hub.download(
            source.record["location"], [prefix + n for n in names], revision=source.record["commit"]
        )
        if any((root / prefix).glob("diffusion_pytorch_model*")):
            source.folder = root / prefix if prefix else root
            return
    raise VaelinkError(f"{source.record['location']} has no diffusers weights for its VAE")


def _locate(location: str, subfolder: str | None, revision: str | None) -> _Source:
    path = Path(location)
    if path.is_file():
        return _Source(None, path, {"location": location})
    if path.is_dir():
        folder = _vae_folder(path, subfolder)
        if folder is None:
            raise VaelinkError(f"{path} holds no {CONFIG} of a diffusers VAE")
        return _Source(folder, None, {"location": location, "subfolder": subfolder})
    return _fetch(location, subfolder, revision)


def _module_config(vae: Any) -> dict[str, Any]:
    """A loaded VAE's config, with the diffusers class it is (or derives from)."""
    names = [cls.__name__ for cls in type(vae).__mro__]
    kind = next((n for n in names if n in ("AutoencoderKL", "AutoencoderTiny")), names[0])
    return {**dict(getattr(vae, "config", None) or {}), "_class_name": kind}


def _load(source: _Source, architecture: str) -> Any:
    _require_torch()
    import diffusers

    cls = getattr(diffusers, architecture)
    if source.checkpoint is not None:
        return cls.from_single_file(str(source.checkpoint))
    return cls.from_pretrained(str(source.folder))


def _card_for(
    name: str, template: ModelCard | None, config: dict[str, Any], where: str
) -> tuple[ModelCard, dict[str, Any]]:
    """The export's card: the template's (a built-in card) with the constants the source's config
    states - what they disagree on is warned about and returned for the manifest - or, without a
    template, one derived from the config. A VAE that does not fit its card raises
    `ModelMismatchError` here, before anything is exported."""
    if template is None:
        card = card_from_config(name, config, where=where)
        return dataclasses.replace(card, description=f"custom {card.description}"), {}
    card, disagreements = fit_card(template, config, where)
    for key, values in disagreements.items():
        warnings.warn(
            f"{where} says {key} = {values['config']}, the card {template.name!r} says "
            f"{values['card']}; the export uses the config's",
            VaelinkWarning,
            stacklevel=3,
        )
    return dataclasses.replace(card, name=name), disagreements


def export_model(
    model: str | None = None,
    *,
    name: str | None = None,
    source: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    output: Path | None = None,
    variants: Sequence[str] = ("float32", "float16"),
) -> Path:
    """Exports a VAE to ONNX; returns the export folder (by default the cache's, under its name).

    `model` is the card it is exported as (`vaelink models`), its weights from the card's hub repo
    or from `source`: another repo id (fetched through the Hugging Face cache: `HF_HOME`, the saved
    login or `HF_TOKEN`, `revision`), a local diffusers folder or a single-file checkpoint; it is
    stored as `name` (default: the card's). Without a card, `name` and `source` give a VAE that is
    none of the cards (a fine-tune, a custom VAE): its card is derived from its `config.json`. The
    constants come from the source's `config.json` where it states them; a VAE that does not fit
    its card is a `ModelMismatchError` before anything is exported."""
    if model is None and (name is None or source is None):
        raise VaelinkError("name a model card, or give --source and --name for a custom VAE")
    try:
        template = get_card(model) if model is not None else None
    except UnknownModelError as e:
        raise UnknownModelError(
            f"{e}; for a VAE that is none of them, pass --source and --name"
        ) from None
    name = check_name(name or str(model))
    location = source or (template.repo if template else None)
    if location is None:
        raise VaelinkError(f"model {model!r} names no weights; pass a source")
    subfolder = subfolder or (template.subfolder if template and not source else None)
    located = _locate(location, subfolder, revision or (template.revision if template else None))
    where = f"the VAE at {location}"
    config = located.config()
    card, disagreements = (None, {}) if config is None else _card_for(name, template, config, where)
    if located.record.get("commit") is not None:
        _fetch_weights(located)
    known = card or template
    if known is None:
        raise VaelinkError(
            f"{location} is a single-file checkpoint: name the card it is exported as "
            "(`vaelink export CARD --source FILE`)"
        )
    vae = _load(located, known.architecture)
    if card is None:  # a single-file checkpoint: the loaded module's config is all there is
        card, disagreements = _card_for(name, template, _module_config(vae), where)
    record = {**located.record, **({"disagreements": disagreements} if disagreements else {})}
    return export_vae(vae, card, output or export_dir(name), variants=variants, source=record)
