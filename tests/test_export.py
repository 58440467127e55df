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
from vaelink.errors import ModelNotExportedError, ProviderUnavailableError, VaelinkError
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
            ops = collections.Counter(node.op_type for node in graph.graph.node)
            # KL's mid-block attention is one MultiHeadAttention: no (h*w)^2 score matrix.
            attends = 1 if model.card.has_posterior else 0
            assert (ops["MultiHeadAttention"], ops["Softmax"]) == (attends, 0), ops
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
        assert (ops["MultiHeadAttention"], ops["Softmax"]) == (1, 0), ops
        for value in (*graph.graph.input, *graph.graph.output):
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # The CPU engine takes the plain float16 graph; the CUDA one would take the fused graph.
    engine = Engine(output, provider="cpu", dtype="float16")
    assert engine._variant("float16") == "float16"
    assert ef.rel_err(engine.encode(image), model.encode(image)) <= 1e-2
    engine.provider = "cuda"  # what an engine on a GPU picks (tests/test_engine.py: fake CUDA)
    assert engine._variant("float16") == "float16-cuda"
    with pytest.raises(ProviderUnavailableError, match="no CUDA provider"):
        Engine(output, provider="cuda")  # the CPU build of ONNX Runtime is installed here


def test_export_model_from_a_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image: np.ndarray
) -> None:
    """A card of our own, registered for the test, exported from a diffusers folder whose
    config.json states the card's shift factor (and diffusers' default scaling factor: null there
    would leave the card's)."""
    card = dataclasses.replace(ef.CONFIGS["sd3-like"].card, name="test-sd3", repo="nobody/nothing")
    monkeypatch.setitem(cards._cards(), card.name, card)
    source = tmp_path / "diffusers"
    vae = ef.CONFIGS["sd3-like"].build()
    vae.register_to_config(scaling_factor=card.scaling_factor, shift_factor=card.shift_factor)
    vae.save_pretrained(source)
    output = export.export_model("test-sd3", source=str(source), output=tmp_path / "out")
    assert output == tmp_path / "out"
    manifest = read_manifest(output)
    assert manifest.card == card and "disagreements" not in manifest.source
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


# -- from the Hugging Face cache, cards checked, custom VAEs ----------------------------------------


@pytest.fixture
def hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An offline Hub cache (laid out by the tests) and an empty vaelink cache."""
    from hub_fixtures import offline_hub

    monkeypatch.setenv("VAELINK_HOME", str(tmp_path / "vaelink-home"))
    return offline_hub(monkeypatch, tmp_path)


def publish_vae(
    cache: Path, repo_id: str, vae: object, tmp_path: Path, prefix: str = "", **config: object
) -> Path:
    """`vae` saved with diffusers and laid out as `repo_id` in the Hub cache (under `prefix`, a
    pipeline's `vae/`), its config.json changed by `config` (None: the key left out)."""
    from hub_fixtures import folder_files, hub_repo

    folder = tmp_path / repo_id.replace("/", "--")
    vae.save_pretrained(folder)  # type: ignore[attr-defined]
    data = json.loads((folder / "config.json").read_text())
    data.update(config)
    data = {k: v for k, v in data.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(data))
    hub_repo(cache, repo_id, folder_files(folder, prefix))
    return folder


def test_export_fetches_through_the_hub_cache_and_takes_the_configs_constants(
    hub_cache: Path, tmp_path: Path, image: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fine-tune of taesd whose config.json states another scaling factor: the config wins, the
    disagreement is warned about and recorded; the weights come from the Hub cache, offline."""
    vae = ef.tiny_vae(4, 4)
    publish_vae(hub_cache, "someone/taesd-ft", vae, tmp_path, scaling_factor=0.5, shift_factor=0.25)
    with pytest.warns(vaelink.VaelinkWarning) as warned:
        folder = export.export_model("taesd", source="someone/taesd-ft", variants=("float32",))
    assert [str(w.message) for w in warned] == [
        "the VAE at someone/taesd-ft says scaling_factor = 0.5, the card 'taesd' says 1.0; the "
        "export uses the config's",
        "the VAE at someone/taesd-ft says shift_factor = 0.25, the card 'taesd' says 0.0; the "
        "export uses the config's",
    ]
    assert "fetching config.json" in capsys.readouterr().err  # progress is printed
    manifest = read_manifest(folder)
    assert (manifest.card.scaling_factor, manifest.card.shift_factor) == (0.5, 0.25)
    assert manifest.card == dataclasses.replace(
        cards.get_card("taesd"), scaling_factor=0.5, shift_factor=0.25
    )
    assert manifest.source["disagreements"] == {
        "scaling_factor": {"card": 1.0, "config": 0.5},
        "shift_factor": {"card": 0.0, "config": 0.25},
    }
    assert manifest.source["location"] == "someone/taesd-ft"
    snapshots = hub_cache / "models--someone--taesd-ft" / "snapshots"
    assert [p.name for p in snapshots.iterdir()] == [manifest.source["commit"]]
    engine = Engine("taesd", provider="cpu")
    assert engine.card.scaling_factor == 0.5  # the export's card, by name
    reference = ef.Exported("taesd", vae, manifest.card, folder)
    assert ef.rel_err(engine.encode(image), reference.encode(image)) <= 1e-4


def test_a_config_without_constants_keeps_the_cards(hub_cache: Path, tmp_path: Path) -> None:
    publish_vae(
        hub_cache,
        "someone/plain",
        ef.tiny_vae(4, 4),
        tmp_path,
        scaling_factor=None,
        shift_factor=None,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", vaelink.VaelinkWarning)  # nothing to disagree on
        folder = export.export_model("taesd", source="someone/plain", variants=("float32",))
    manifest = read_manifest(folder)
    assert manifest.card == cards.get_card("taesd") and "disagreements" not in manifest.source


def test_a_custom_vae_by_name_from_a_pipeline_repo(
    hub_cache: Path, tmp_path: Path, image: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vaelink export --source REPO --name NAME`: a VAE that is none of the cards, in a pipeline's
    `vae/` folder; its card is derived from its config and the name works like a card's."""
    vae = ef.CONFIGS["sd3-like"].build()
    mean = [0.1 * i for i in range(16)]
    publish_vae(
        hub_cache,
        "lab/pipe",
        vae,
        tmp_path,
        prefix="vae/",
        scaling_factor=1.5,
        shift_factor=0.06,
        latents_mean=mean,
        latents_std=[2.0] * 16,
    )
    code = cli.main(["export", "--source", "lab/pipe", "--name", "my-vae", "--variants", "float32"])
    assert code == 0, capsys.readouterr().err
    card = vaelink.VAE("my-vae").card
    assert (card.name, card.architecture, card.latent_channels, card.spatial_factor) == (
        "my-vae",
        "AutoencoderKL",
        16,
        4,
    )
    assert (card.scaling_factor, card.shift_factor) == (1.5, 0.06)
    assert card.latents_mean == tuple(mean) and card.latents_std == (2.0,) * 16
    folder = tmp_path / "vaelink-home" / "exports" / "my-vae"
    assert read_manifest(folder).source["subfolder"] == "vae"
    reference = ef.Exported("my-vae", vae, card, folder)
    latents = vaelink.VAE("my-vae").encode(image)
    assert ef.rel_err(latents, reference.encode(image)) <= 1e-4
    assert cli.main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "my-vae" in rows and "float32" in rows["my-vae"] and "custom" in rows["my-vae"]


@pytest.mark.parametrize(
    ("build", "card", "difference"),
    [
        (
            lambda: ef.kl_vae((8, 16, 16, 16), 16, quant_conv=False),
            "sd15",
            "latent channels is 16, sd15's is 4",
        ),
        (
            lambda: ef.kl_vae((8, 16), 4, quant_conv=True),
            "sd15",
            "spatial factor is 2, sd15's is 8",
        ),
        (
            lambda: ef.tiny_vae(4, 4),
            "sd15",
            "architecture is AutoencoderTiny, sd15's is AutoencoderKL",
        ),
    ],
)
def test_a_vae_that_does_not_fit_its_card_is_one_sentence_before_any_download_or_export(
    hub_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    build: object,
    card: str,
    difference: str,
) -> None:
    from hub_fixtures import hub_repo

    folder = publish_vae(hub_cache, "someone/vae", build(), tmp_path)  # type: ignore[operator]
    hub_repo(hub_cache, "someone/config-only", {"config.json": folder / "config.json"})

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the ONNX export started")

    monkeypatch.setattr(export, "_export_graph", never)
    # No weights in the repo: the card is checked on the config, before they are fetched.
    with pytest.raises(vaelink.ModelMismatchError, match=difference):
        export.export_model(card, source="someone/config-only")
    capsys.readouterr()
    assert cli.main(["export", card, "--source", str(folder)]) == 1  # a local folder too
    err = capsys.readouterr().err
    assert err.startswith("vaelink: error: the VAE at") and difference in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "vaelink-home" / "exports").exists()


def test_export_vae_checks_the_module_against_the_card(tmp_path: Path) -> None:
    vae = ef.CONFIGS["sd3-like"].build()
    with pytest.raises(vaelink.ModelMismatchError, match="latent channels is 16, tiny-sdxl's is 4"):
        export.export_vae(vae, ef.CONFIGS["sdxl-like"].card, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_then_push_to_hub(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    hub_cache: Path,
) -> None:
    import huggingface_hub

    calls: list[dict[str, object]] = []

    def record(api: object, **kwargs: object) -> str:
        calls.append(kwargs)
        return "https://huggingface.co/me/taesd/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, repo_id, **kw: repo_id)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", record)
    source = tmp_path / "taesd"
    ef.tiny_vae(4, 4).save_pretrained(source)
    args = ["export", "taesd", "--source", str(source), "--variants", "float32"]
    assert cli.main([*args, "--push-to-hub", "me/taesd"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "vaelink-home" / "exports" / "taesd"
    assert f"published {folder} as me/taesd: https://huggingface.co/me/taesd/commit/abc" in out
    (call,) = calls
    assert call["repo_id"] == "me/taesd" and call["folder_path"] == str(folder)
    assert call["allow_patterns"] == [MANIFEST, "encoder-float32.onnx", "decoder-float32.onnx"]
