"""ONNX exports made by other tools, run without re-exporting: the layout of ONNX Runtime and optimum
Stable Diffusion exports, a folder with `vae_encoder/model.onnx` and `vae_decoder/model.onnx`
(directly, or under `onnx/`, as some Hub repos keep them).

`import_onnx` links their graphs (a copy across file systems) into a vaelink export folder with a
manifest, after checking them against the card: one given, or one derived from the VAE's config that
optimum writes beside each graph (`vae_decoder/config.json`), or a `vae/config.json` beside the
folder. `VAE(folder)` / `Engine(folder)` import such a folder on first use (`imported`).

The graphs as optimum exports them: the encoder takes `sample` (images in [-1, 1]) and returns
`latent_parameters`, the posterior's moments - what vaelink's own encoder returns - or, from older
optimum, `latent_sample`, a sample drawn inside the graph: that graph is cut back to the moments
(its last convolution; needs `onnx`). AutoencoderTiny's encoder returns its latents. The decoder
takes `latent_sample` (unscaled latents) and returns `sample`. Shapes are checked, not names: a
probe runs each graph once on a small input before anything is written."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cards import ModelCard, card_from_config, fit_card, get_card, memory_config, read_config
from .errors import CorruptExportError, ModelMismatchError, VaelinkError
from .exports import (
    MANIFEST,
    Manifest,
    cache_dir,
    check_name,
    export_dir,
    file_entry,
    read_manifest,
    staged,
    versions,
)
from .runtime import RUNTIME_DISTRIBUTIONS, load_onnxruntime

__all__ = ["find_onnx_layout", "import_onnx", "imported"]

PARTS = {"encoder": "vae_encoder", "decoder": "vae_decoder"}
GRAPH = "model.onnx"
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def find_onnx_layout(folder: Path) -> Path | None:
    """The folder holding `vae_decoder/model.onnx` (and `vae_encoder/`): `folder` or its `onnx/`."""
    for base in (folder, folder / "onnx"):
        if (base / PARTS["decoder"] / GRAPH).is_file():
            return base
    return None


def _config(base: Path) -> tuple[dict[str, Any], Path] | None:
    """The VAE's diffusers config: beside a graph (optimum writes one), or a pipeline's `vae/`."""
    candidates = [
        base / PARTS["decoder"],
        base / PARTS["encoder"],
        base / "vae",
        base.parent / "vae",
    ]
    for path in (folder / "config.json" for folder in candidates):
        if path.is_file():
            return read_config(path), path
    return None


@dataclasses.dataclass
class _Graph:
    path: Path
    session: Any
    dtype: str

    @property
    def input_shape(self) -> list[Any]:
        return list(self.session.get_inputs()[0].shape)

    def run(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output shape for zeros of `shape` (the graph's dtype)."""
        feed = {self.session.get_inputs()[0].name: np.zeros(shape, np.dtype(self.dtype))}
        try:
            (out,) = self.session.run(None, feed)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelMismatchError(
                f"{self.path} does not run on a {shape} input: {str(e).splitlines()[0]}"
            ) from None
        return tuple(out.shape)


def _open(path: Path) -> _Graph:
    ort = load_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise CorruptExportError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4:
        raise ModelMismatchError(
            f"{path} is no VAE graph vaelink runs: it has {len(inputs)} inputs and "
            f"{len(outputs)} outputs, not one 4-D input and one output"
        )
    dtype = _DTYPES.get(inputs[0].type)
    if dtype is None or _DTYPES.get(outputs[0].type) != dtype:
        raise ModelMismatchError(f"{path} takes {inputs[0].type}, not float32 or float16 tensors")
    return _Graph(path, session, dtype)


def _cut_at_moments(src: Path, dst: Path, channels: int) -> None:
    """An encoder that samples inside the graph, cut back to the posterior's moments: the output
    of its last convolution (`quant_conv`, or `conv_out` without one), `2 * channels` wide."""
    try:
        import onnx
    except ImportError:
        raise VaelinkError(
            f"{src} samples its latents inside the graph (an older optimum export); cutting it "
            "back to the posterior needs onnx: pip install onnx"
        ) from None
    model = onnx.load(str(src))
    weights = {init.name: init for init in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    weight = weights.get(convs[-1].input[1]) if convs else None
    if weight is None or weight.dims[0] != 2 * channels:
        raise ModelMismatchError(
            f"{src} returns a sampled latent and its posterior's moments cannot be found in it"
        )
    graph, target = model.graph, convs[-1].output[0]
    needed, kept = {target}, []
    for node in reversed(graph.node):  # what the moments depend on; the sampling goes
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    elem_type = graph.input[0].type.tensor_type.elem_type
    shape = ["batch", 2 * channels, "height", "width"]
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(target, elem_type, shape))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def _link(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (no second copy), a copy across file systems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _card(
    base: Path, name: str | None, card: str | ModelCard | None
) -> tuple[ModelCard, dict[str, Any]]:
    """The imported model's card and what its config disagreed with the given card on."""
    found = _config(base)
    template = get_card(card) if isinstance(card, str) else card
    if template is None:
        if found is None:
            raise VaelinkError(
                f"{base} has no config.json beside its graphs (vae_decoder/config.json, "
                "vae/config.json): name the card it is (`vaelink import PATH --card CARD`)"
            )
        config, path = found
        derived = card_from_config(name or _name_of(base), config, where=str(path))
        return dataclasses.replace(derived, description=f"imported {derived.description}"), {}
    if found is None:
        return dataclasses.replace(template, name=name or template.name), {}
    config, path = found
    fitted, disagreements = fit_card(template, config, str(path))
    return dataclasses.replace(fitted, name=name or template.name), disagreements


def _name_of(base: Path) -> str:
    """A model name from a folder's name (an optimum export's folder, or its parent's for
    `onnx/`)."""
    folder = base.resolve()
    stem = folder.parent.name if folder.name == "onnx" else folder.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:100] or "imported"


def _check(graphs: dict[str, _Graph], card: ModelCard) -> bool:
    """Checks both graphs against the card by running them on a small input; True when the
    encoder returns a sample to be cut back to the moments."""
    c, f = card.latent_channels, card.spatial_factor
    channels = graphs["decoder"].input_shape[1]
    if isinstance(channels, int) and channels != c:
        raise ModelMismatchError(
            f"{graphs['decoder'].path} does not fit the card {card.name!r}: its latent channels "
            f"is {channels}, {card.name}'s is {c}"
        )
    decoded = graphs["decoder"].run((1, c, 4, 4))
    if decoded[:2] != (1, 3) or decoded[2] != decoded[3]:
        raise ModelMismatchError(
            f"{graphs['decoder'].path} decodes {c}-channel latents to {decoded}, not to images"
        )
    if decoded[2] != 4 * f:
        raise ModelMismatchError(
            f"{graphs['decoder'].path} does not fit the card {card.name!r}: its spatial factor is "
            f"{decoded[2] // 4}, {card.name}'s is {f}"
        )
    encoded = graphs["encoder"].run((1, 3, 4 * f, 4 * f))
    moments = 2 * c if card.has_posterior else c
    if encoded[2:] != (4, 4) or encoded[1] not in (c, moments):
        raise ModelMismatchError(
            f"{graphs['encoder'].path} does not fit the card {card.name!r}: it encodes "
            f"{4 * f}x{4 * f} images to {encoded}, not to {c}-channel latents of 4x4"
        )
    return encoded[1] != moments


def import_onnx(
    source: Path,
    *,
    name: str | None = None,
    card: str | ModelCard | None = None,
    output: Path | None = None,
    variants: Sequence[str] | None = None,
) -> Path:
    """Makes an ONNX Runtime / optimum export (`vae_encoder/model.onnx`, `vae_decoder/model.onnx`)
    a vaelink export named `name`, in `output` (default: the cache's folder for `name`, so that the
    name works everywhere a card's does). `card`: the card it is (a name or a `ModelCard`), else
    derived from its config. `variants`: the graphs' own dtype (default), plus `float16` converted
    from float32 ones (needs onnx). A graph that does not fit the card raises `ModelMismatchError`
    before anything is written. Returns the export folder."""
    base = find_onnx_layout(Path(source))
    if base is None:
        raise CorruptExportError(
            f"{source} has no {PARTS['decoder']}/{GRAPH}: not an ONNX Runtime or optimum export"
        )
    missing = [p for p in PARTS.values() if not (base / p / GRAPH).is_file()]
    if missing:
        raise CorruptExportError(f"{base} has no {missing[0]}/{GRAPH}: vaelink needs both graphs")
    model_card, disagreements = _card(base, name, card)
    check_name(model_card.name)
    graphs = {part: _open(base / folder / GRAPH) for part, folder in PARTS.items()}
    dtype = graphs["decoder"].dtype
    if graphs["encoder"].dtype != dtype:
        raise ModelMismatchError(f"{base}'s encoder and decoder differ in dtype")
    wanted = list(variants or [dtype])
    if not set(wanted) <= {dtype, "float16"} or dtype not in wanted:
        raise VaelinkError(f"{base} holds {dtype} graphs: variants can be {dtype} and float16")
    sampled = _check(graphs, model_card)
    output = Path(output) if output else export_dir(model_card.name)
    with staged(output) as work:
        files: dict[str, dict[str, Any]] = {dtype: {}}
        data_files = []
        for part, folder in PARTS.items():
            for path in sorted((base / folder).iterdir()):  # the graph and its external data
                if path.is_file() and not (sampled and part == "encoder" and path.name == GRAPH):
                    _link(path, work / folder / path.name)
                    entry = file_entry(work, f"{folder}/{path.name}")
                    if path.name == GRAPH:
                        files[dtype][part] = entry
                    elif path.name != "config.json":
                        data_files.append(entry)
            if sampled and part == "encoder":
                _cut_at_moments(
                    base / folder / GRAPH, work / folder / GRAPH, model_card.latent_channels
                )
                files[dtype][part] = file_entry(work, f"{folder}/{GRAPH}")
        if "float16" in wanted and dtype != "float16":
            from .export import _to_float16

            files["float16"] = {}
            for part, folder in PARTS.items():
                _to_float16(work / folder / GRAPH, work / folder / "model-float16.onnx")
                files["float16"][part] = file_entry(work, f"{folder}/model-float16.onnx")
        found = _config(base)
        record: dict[str, Any] = {
            "location": str(Path(source).resolve()),
            "format": "onnx-vae-folders",
            "encoder_output": graphs["encoder"].session.get_outputs()[0].name,
            "cut_to_moments": sampled,
            "stat": _stat(base),
            "config": memory_config(found[0] if found else {}, model_card),
        }
        if disagreements:
            record["disagreements"] = disagreements
        manifest = Manifest(
            card=model_card,
            variants=files,
            source=record,
            exporter=versions(*RUNTIME_DISTRIBUTIONS, "onnx"),
            data_files=data_files,
        )
        (work / MANIFEST).write_text(manifest.to_json())
    read_manifest(output)
    return output


def _stat(base: Path) -> list[list[Any]]:
    """What tells a changed source: each graph's path, size and modification time."""
    paths = sorted(p for folder in PARTS.values() for p in (base / folder).iterdir() if p.is_file())
    return [[p.relative_to(base).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def imported(source: Path) -> Path:
    """The vaelink export of an ONNX Runtime / optimum folder, imported into the cache
    (`imports/<hash of its path>`) on first use and again whenever its files change."""
    resolved = Path(source).resolve()
    base = find_onnx_layout(resolved)
    if base is None:
        raise CorruptExportError(f"{source} is not an ONNX Runtime or optimum export")
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    folder = cache_dir() / "imports" / key
    with contextlib.suppress(CorruptExportError):
        if read_manifest(folder, verify=False).source.get("stat") == _stat(base):
            return folder
    return import_onnx(resolved, output=folder)
