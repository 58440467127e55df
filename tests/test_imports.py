"""`vaelink.imports`: ONNX Runtime / optimum exports (`vae_encoder/model.onnx`, `vae_decoder/model.onnx`)
run without re-exporting. The tests build such folders themselves - tiny seeded VAEs exported with
torch.onnx in optimum's layout, naming and wrappers (current optimum's `latent_parameters` encoder,
older optimum's sampling `latent_sample` one, AutoencoderTiny's) - and compare with diffusers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import engine_fixtures as ef
import numpy as np
import onnx
import pytest
import torch

import vaelink
from vaelink.cli import main
from vaelink.engine import Engine
from vaelink.errors import CorruptExportError, ModelMismatchError
from vaelink.exports import read_manifest, resolve_model
from vaelink.imports import import_onnx


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with ef.one_torch_thread():
        yield


@pytest.fixture(autouse=True)
def _home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path / "vaelink-home"))


class _Module(torch.nn.Module):
    def __init__(self, vae: Any, forward: Any) -> None:
        super().__init__()
        self.vae, self._forward = vae, forward

    def forward(self, x: Any) -> Any:
        return self._forward(self.vae, x)


def optimum_export(vae: Any, folder: Path, *, encoder: str = "latent_parameters") -> Path:
    """`vae` exported as optimum does: `vae_encoder/model.onnx` (`sample` -> `encoder`: the
    posterior's parameters, a sample drawn in the graph, or AutoencoderTiny's latents) and
    `vae_decoder/model.onnx` (`latent_sample` -> `sample`), each with the VAE's config.json, and
    the pipeline's model_index.json."""
    tiny = isinstance(vae, ef.AutoencoderTiny)
    encoders = {
        "latent_parameters": lambda v, x: v.encode(x).latent_dist.parameters,
        "latent_sample": (lambda v, x: v.encode(x).latents)
        if tiny
        else (lambda v, x: v.encode(x).latent_dist.sample()),
    }
    f = 2 ** (
        len(vae.config.get("encoder_block_out_channels") or vae.config.block_out_channels) - 1
    )
    graphs = {
        "vae_encoder": (
            _Module(vae, encoders[encoder]),
            torch.zeros(1, 3, 8 * f, 8 * f),
            "sample",
            encoder,
        ),
        "vae_decoder": (
            _Module(vae, lambda v, z: v.decode(z).sample),
            torch.zeros(1, vae.config.latent_channels, 8, 8),
            "latent_sample",
            "sample",
        ),
    }
    axes = {0: "batch", 2: "height", 3: "width"}
    for name, (module, example, inp, out) in graphs.items():
        (folder / name).mkdir(parents=True)
        with torch.no_grad():
            torch.onnx.export(
                module.eval(),
                (example,),
                str(folder / name / "model.onnx"),
                dynamo=False,
                opset_version=17,
                input_names=[inp],
                output_names=[out],
                dynamic_axes={inp: axes, out: axes},
            )
        vae.save_config(folder / name)  # optimum writes the VAE's config beside each graph
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def reference(vae: Any, card: Any, folder: Path) -> ef.Exported:
    return ef.Exported("imported", vae, card, folder)


@pytest.fixture
def image(photos: dict[str, np.ndarray]) -> np.ndarray:
    return vaelink.preprocess(ef.photo_batch(photos["chelsea"], 2, 32, 48))


def test_an_optimum_folder_runs_as_is(tmp_path: Path, image: np.ndarray) -> None:
    """`Engine(folder)` / `VAE(folder)` on an optimum export: imported on first use, its card
    derived from vae_decoder/config.json; results equal diffusers'."""
    vae = ef.CONFIGS["sdxl-like"].build()
    folder = optimum_export(vae, tmp_path / "sd-onnx")
    engine = Engine(folder, provider="cpu")
    card = engine.card
    assert (card.name, card.architecture, card.latent_channels, card.spatial_factor) == (
        "sd-onnx",
        "AutoencoderKL",
        4,
        4,
    )
    assert card.scaling_factor == 0.18215  # the config's
    ref = reference(vae, card, folder)
    latents = engine.encode(image)
    assert ef.rel_err(latents, ref.encode(image)) <= 1e-4
    assert ef.rel_err(engine.decode(latents, output="float"), ref.decode(latents)) <= 1e-4
    sampled = engine.encode(image, sample=True, seed=3)  # moments: sampling works as for exports
    assert not np.allclose(sampled, latents) and np.abs(sampled - latents).max() < 1.0
    imported = engine.folder
    assert read_manifest(imported).source["encoder_output"] == "latent_parameters"
    assert Engine(folder, provider="cpu").folder == imported  # imported once
    assert vaelink.VAE(folder).card == card


def test_vaelink_import_by_name(tmp_path: Path, image: np.ndarray, capsys: Any) -> None:
    vae = ef.CONFIGS["sd3-like"].build()
    folder = optimum_export(vae, tmp_path / "export")
    assert main(["import", str(folder), "--name", "sd3-onnx"]) == 0
    assert "imported" in capsys.readouterr().out
    model = resolve_model("sd3-onnx")
    assert model.card.name == "sd3-onnx" and model.card.latent_channels == 16
    assert model.folder == tmp_path / "vaelink-home" / "exports" / "sd3-onnx"
    graph = model.folder / "vae_decoder" / "model.onnx"
    assert graph.stat().st_ino == (folder / "vae_decoder" / "model.onnx").stat().st_ino  # linked
    latents = vaelink.VAE("sd3-onnx").encode(image)
    ref = reference(vae, model.card, model.folder)
    assert ef.rel_err(latents, ref.encode(image)) <= 1e-4


def test_a_card_gives_the_constants_the_config_lacks(tmp_path: Path, image: np.ndarray) -> None:
    vae = ef.CONFIGS["sd3-like"].build()
    card = ef.CONFIGS["sd3-like"].card
    folder = optimum_export(vae, tmp_path / "export")
    for name in ("vae_encoder", "vae_decoder"):
        (folder / name / "config.json").unlink()
    with pytest.raises(vaelink.VaelinkError, match="--card"):
        import_onnx(folder)
    out = import_onnx(folder, card=card, name="with-card")
    assert read_manifest(out).card == vaelink.exports.dataclasses.replace(card, name="with-card")
    engine = Engine("with-card", provider="cpu")
    ref = reference(vae, engine.card, out)
    assert ef.rel_err(engine.encode(image), ref.encode(image)) <= 1e-4  # the card's shift, scale


def test_an_older_optimum_encoder_that_samples_is_cut_to_the_moments(
    tmp_path: Path, image: np.ndarray
) -> None:
    vae = ef.CONFIGS["sd15-like"].build()
    folder = optimum_export(vae, tmp_path / "old", encoder="latent_sample")
    source = onnx.load(str(folder / "vae_encoder" / "model.onnx"))
    assert "RandomNormalLike" in {n.op_type for n in source.graph.node}  # it does sample
    out = import_onnx(folder, name="old")
    manifest = read_manifest(out)
    assert manifest.source["cut_to_moments"] is True
    cut = onnx.load(str(out / "vae_encoder" / "model.onnx"))
    assert "RandomNormalLike" not in {n.op_type for n in cut.graph.node}
    assert (folder / "vae_encoder" / "model.onnx").read_bytes() == source.SerializeToString()
    engine = Engine("old", provider="cpu")
    ref = reference(vae, engine.card, out)
    latents = engine.encode(image)
    assert ef.rel_err(latents, ref.encode(image)) <= 1e-4  # the mean: deterministic again
    assert ef.rel_err(engine.decode(latents, output="float"), ref.decode(latents)) <= 1e-4


def test_a_tiny_autoencoder_and_a_float16_variant(tmp_path: Path, image: np.ndarray) -> None:
    vae = ef.CONFIGS["taesd-like"].build()
    folder = optimum_export(vae, tmp_path / "taesd", encoder="latent_sample")
    out = import_onnx(folder, name="taesd-onnx", variants=["float32", "float16"])
    assert list(read_manifest(out).variants) == ["float32", "float16"]
    card = read_manifest(out).card
    assert (card.architecture, card.spatial_factor) == ("AutoencoderTiny", 4)
    ref = reference(vae, card, out)
    for dtype, tolerance in (("float32", 1e-4), ("float16", 2e-2)):
        engine = Engine("taesd-onnx", provider="cpu", dtype=dtype)  # type: ignore[arg-type]
        assert ef.rel_err(engine.encode(image), ref.encode(image)) <= tolerance


def test_external_data_is_linked_and_verified(tmp_path: Path, image: np.ndarray) -> None:
    vae = ef.CONFIGS["sdxl-like"].build()
    folder = optimum_export(vae, tmp_path / "big")
    graph = folder / "vae_decoder" / "model.onnx"
    model = onnx.load(str(graph))
    onnx.save(
        model, str(graph), save_as_external_data=True, location="model.onnx_data", size_threshold=0
    )
    out = import_onnx(folder, name="big")
    manifest = read_manifest(out)
    assert [e["file"] for e in manifest.data_files] == ["vae_decoder/model.onnx_data"]
    engine = Engine("big", provider="cpu")
    ref = reference(vae, engine.card, out)
    latents = engine.encode(image)
    assert ef.rel_err(engine.decode(latents, output="float"), ref.decode(latents)) <= 1e-4
    data = out / "vae_decoder" / "model.onnx_data"
    data.unlink()
    data.write_bytes(b"\0" * manifest.data_files[0]["bytes"])
    with pytest.raises(CorruptExportError, match=r"model.onnx_data does not match"):
        Engine("big", provider="cpu")


@pytest.mark.parametrize(
    ("key", "card", "difference"),
    [
        ("sd3-like", "sd15", "latent channels is 16, sd15's is 4"),
        ("sdxl-like", "sd15", "spatial factor is 4, sd15's is 8"),
        ("taesd-like", "tiny-sdxl", "architecture is AutoencoderTiny"),
    ],
)
def test_a_graph_that_does_not_fit_the_card(
    tmp_path: Path, key: str, card: str, difference: str, capsys: Any
) -> None:
    folder = optimum_export(ef.CONFIGS[key].build(), tmp_path / "x", encoder="latent_sample")
    given = vaelink.cards.get_card(card) if card == "sd15" else ef.CONFIGS["sdxl-like"].card
    with pytest.raises(ModelMismatchError, match=difference):
        import_onnx(folder, card=given, name="x")
    for name in ("vae_encoder", "vae_decoder"):  # without a config, the graphs tell
        (folder / name / "config.json").unlink()
    if card == "sd15":
        assert main(["import", str(folder), "--card", card]) == 1
        err = capsys.readouterr().err
        assert err.startswith("vaelink: error: ") and "does not fit the card 'sd15'" in err
        assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "vaelink-home" / "exports").exists()


def test_a_folder_without_both_graphs(tmp_path: Path) -> None:
    folder = optimum_export(ef.CONFIGS["sd15-like"].build(), tmp_path / "x")
    (folder / "vae_encoder" / "model.onnx").unlink()
    with pytest.raises(CorruptExportError, match=r"no vae_encoder/model\.onnx"):
        import_onnx(folder)
    with pytest.raises(CorruptExportError, match="not an ONNX Runtime or optimum export"):
        import_onnx(tmp_path)
