"""Exporting diffusers VAEs to ONNX: the graphs, the manifest, the variants (float16-cuda's fused
graph included), `export_model` from a local diffusers folder, `vaelink export`, and an interrupted
export leaving nothing behind."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.metadata
import json
from collections.abc import Iterator
from pathlib import Path

import engine_fixtures as ef
import numpy as np
import onnx
import pytest

import vaelink
from vaelink import cards, cli, export
from vaelink.cards import ModelCard
from vaelink.engine import Engine
from vaelink.errors import ModelNotExportedError, VaelinkError
from vaelink.exports import MANIFEST, read_manifest


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with ef.one_torch_thread():
        yield


@pytest.fixture(scope="module", params=list(ef.CONFIGS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ef.Exported:
    return ef.exported(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def image(photos: dict[str, np.ndarray]) -> np.ndarray:
    return vaelink.preprocess(ef.photo_batch(photos["chelsea"], 1, 64, 64))


def test_manifest(model: ef.Exported) -> None:
    data = json.loads((model.folder / MANIFEST).read_text())
    assert data["format_version"] == 1
    assert data["card"] == dataclasses.asdict(model.card)
    assert set(data["variants"]) == {"float32", "float16"}
    for variant, parts in data["variants"].items():
        assert set(parts) == {"encoder", "decoder"}
        for part, info in parts.items():
            assert info["file"] == f"{part}-{variant}.onnx"
            content = (model.folder / info["file"]).read_bytes()
            assert info["bytes"] == len(content)
            assert info["sha256"] == hashlib.sha256(content).hexdigest()
    for package in ("vaelink", "torch", "diffusers", "onnx", "onnxruntime"):
        assert data["exporter"][package] == importlib.metadata.version(package)
    config = data["source"]["config"]
    assert config["full_res_channels"] == 8
    assert config["attention"] is model.card.has_posterior  # AutoencoderKL's mid-block attention
    assert sorted(p.name for p in model.folder.iterdir()) == sorted(
        [MANIFEST]
        + [f"{part}-{v}.onnx" for v in ("float32", "float16") for part in parts]
        + (["segments"] if model.card.has_posterior else [])  # exact tiling's (tests/test_exact.py)
    )
    segments = data.get("segments", {})
    assert set(segments) == ({"encoder", "decoder"} if model.card.has_posterior else set())
    assert set(data.get("fused", {})) == set(segments)  # fast tiling's, one graph a part
    entries = [s for steps in segments.values() for s in steps if "file" in s]
    for entry in entries + list(data.get("fused", {}).values()):
        content = (model.folder / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
    assert read_manifest(model.folder).card == model.card


def test_graphs(model: ef.Exported) -> None:
    channels = model.card.latent_channels
    moments = 2 * channels if model.card.has_posterior else channels
    for variant, elem_type in (
        ("float32", onnx.TensorProto.FLOAT),
        ("float16", onnx.TensorProto.FLOAT16),
    ):
        for part, (inp, out, c_in, c_out) in {
            "encoder": ("image", "moments", 3, moments),
            "decoder": ("latent", "image", channels, 3),
        }.items():
            graph = onnx.load(str(model.folder / f"{part}-{variant}.onnx"))
            onnx.checker.check_model(graph)
            (i,), (o,) = graph.graph.input, graph.graph.output
            assert (i.name, o.name) == (inp, out)
            for value, c in ((i, c_in), (o, c_out)):
                assert value.type.tensor_type.elem_type == elem_type
                dims = value.type.tensor_type.shape.dim
                # batch, height and width are dynamic; channels fixed
                assert [d.dim_param or d.dim_value for d in dims] == ["batch", c, "height", "width"]


def test_export_runs_at_other_sizes_and_batches(model: ef.Exported, photos) -> None:
    """The dynamic axes work: sizes and batches other than the export's example."""
    f = model.card.spatial_factor
    engine = model.engine()
    for n, h, w in ((3, 2 * f, 2 * f), (1, 10 * f, 4 * f)):
        x = vaelink.preprocess(ef.photo_batch(photos["coffee"], n, h, w))
        latents = engine.encode(x)
        assert latents.shape == (n, model.card.latent_channels, h // f, w // f)
        assert ef.rel_err(latents, model.encode(x)) <= 1e-4
        assert ef.rel_err(engine.decode(latents, output="float"), model.decode(latents)) <= 1e-4


@pytest.mark.parametrize(
    "variants", [(), ("float16",), ("float32", "bfloat16"), ("float32", "float16", "int8")]
)
def test_bad_variants(variants: tuple[str, ...], tmp_path: Path) -> None:
    vae = ef.CONFIGS["taesd-like"].build()
    with pytest.raises(VaelinkError, match="variants"):
        export.export_vae(vae, ef.CONFIGS["taesd-like"].card, tmp_path / "out", variants=variants)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_the_old_one(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ef.exported("taesd-like", tmp_path_factory)
    output = model.copy(tmp_path / "export")
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    def fail(src: Path, dst: Path) -> None:
        raise KeyboardInterrupt  # even an interrupt cleans up

    monkeypatch.setattr(export, "_to_float16", fail)
    with pytest.raises(KeyboardInterrupt):
        export.export_vae(model.vae, model.card, output)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no half-written folder left
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    read_manifest(output)

    monkeypatch.undo()
    missing = tmp_path / "new"
    monkeypatch.setattr(export, "_to_float16", fail)
    with pytest.raises(KeyboardInterrupt):
        export.export_vae(model.vae, model.card, missing)
    assert not missing.exists()


def test_export_replaces_an_existing_export(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, image: np.ndarray
) -> None:
    model = ef.exported("taesd-like", tmp_path_factory)
    output = model.copy(tmp_path / "export")
    (output / "stale.onnx").write_bytes(b"old")
    export.export_vae(model.vae, model.card, output, variants=("float32",))
    assert sorted(p.name for p in output.iterdir()) == [
        "decoder-float32.onnx",
        "encoder-float32.onnx",
        MANIFEST,
    ]
    assert list(read_manifest(output).variants) == ["float32"]
    assert ef.rel_err(Engine(output, provider="cpu").encode(image), model.encode(image)) <= 1e-4


def test_float16_cuda_variant(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, image: np.ndarray
) -> None:
    """ONNX Runtime's stable-diffusion fusions run on a CPU-only onnxruntime too; the graph needs the
    CUDA provider to run (its fused ops have no CPU kernels), so only its contents are checked."""
    model = ef.exported("sd15-like", tmp_path_factory)
    output = export.export_vae(
        model.vae, model.card, tmp_path / "cuda", variants=("float32", "float16", "float16-cuda")
    )
    manifest = read_manifest(output)
    assert list(manifest.variants) == ["float32", "float16", "float16-cuda"]
    for part in ("encoder", "decoder"):
        graph = onnx.load(str(output / f"{part}-float16-cuda.onnx"))
        onnx.checker.check_model(graph)  # sorted, and the com.microsoft opset is declared
        assert "com.microsoft" in {opset.domain for opset in graph.opset_import}
        ops = collections.Counter(node.op_type for node in graph.graph.node)
        assert ops["GroupNorm"] + ops["SkipGroupNorm"] > 0, ops
        assert ops["NhwcConv"] > 0, ops
        assert ops["Conv"] == 0, ops  # every convolution went NHWC
        for value in (*graph.graph.input, *graph.graph.output):
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # The CPU engine takes the plain float16 graph; the CUDA one would take the fused graph.
    engine = Engine(output, provider="cpu", dtype="float16")
    assert engine._variant("float16") == "float16"
    assert ef.rel_err(engine.encode(image), model.encode(image)) <= 1e-2
    assert Engine(output, provider="cuda")._variant("float16") == "float16-cuda"
    assert Engine(output, provider="cuda").dtype == "float16"


def test_export_model_from_a_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image: np.ndarray
) -> None:
    """A card of our own, registered for the test, exported from a diffusers folder."""
    card = dataclasses.replace(ef.CONFIGS["sd3-like"].card, name="test-sd3", repo="nobody/nothing")
    monkeypatch.setitem(cards._cards(), card.name, card)
    source = tmp_path / "diffusers"
    vae = ef.CONFIGS["sd3-like"].build()
    vae.save_pretrained(source)
    output = export.export_model("test-sd3", source=str(source), output=tmp_path / "out")
    assert output == tmp_path / "out"
    manifest = read_manifest(output)
    assert manifest.card == card
    assert manifest.source["location"] == str(source)
    assert list(manifest.variants) == ["float32", "float16"]
    exported = ef.Exported("test-sd3", vae, card, output)
    engine = exported.engine()
    latents = engine.encode(image)
    assert ef.rel_err(latents, exported.encode(image)) <= 1e-4
    assert ef.rel_err(engine.decode(latents, output="float"), exported.decode(latents)) <= 1e-4


def test_export_model_needs_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    card = ModelCard("test-none", "no weights", "AutoencoderTiny", 4, 1.0)
    monkeypatch.setitem(cards._cards(), card.name, card)
    with pytest.raises(VaelinkError, match="names no weights"):
        export.export_model("test-none", output=tmp_path / "out")


def test_vaelink_export_then_engine_by_name(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    image: np.ndarray,
) -> None:
    """A real card (taesd), weights from a local folder, exported into VAELINK_HOME by the command
    line, then found by name - by the engine and by `vaelink models`."""
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelNotExportedError, match="vaelink export taesd"):
        Engine("taesd", provider="cpu")

    source = tmp_path / "taesd"
    vae = ef.tiny_vae(4, 4)  # four blocks: spatial factor 8, like the real card's
    vae.save_pretrained(source)
    code = cli.main(["export", "taesd", "--source", str(source), "--variants", "float32"])
    assert code == 0
    folder = tmp_path / "home" / "exports" / "taesd"
    assert f"exported taesd to {folder}" in capsys.readouterr().out

    engine = Engine("taesd", provider="cpu")
    assert engine.folder == folder and engine.card == cards.get_card("taesd")
    latents = engine.encode(image)
    reference = ef.Exported("taesd", vae, engine.card, folder)
    assert latents.shape == (1, 4, 8, 8)
    assert ef.rel_err(latents, reference.encode(image)) <= 1e-4

    assert cli.main(["models"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["taesd"][3] == "float32"
    assert rows["sd15"][3] == "-"


def test_vaelink_export_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", "sd7"]) == 1
    assert "unknown model 'sd7'" in capsys.readouterr().err
