"""The export store: where exports live (VAELINK_HOME, XDG_CACHE_HOME, ~/.cache), manifests and their
checks - built by hand here, no ONNX needed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vaelink.cards import get_card
from vaelink.errors import (
    CorruptExportError,
    ModelNotExportedError,
    UnknownModelError,
    VaelinkError,
)
from vaelink.exports import (
    MANIFEST,
    Manifest,
    Model,
    cache_dir,
    export_dir,
    find_export,
    read_manifest,
    resolve_model,
    sha256_file,
)


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No VAELINK_HOME nor XDG_CACHE_HOME; HOME is a fresh folder. Returns HOME."""
    monkeypatch.delenv("VAELINK_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_cache_dir_default(no_env: Path) -> None:
    assert cache_dir() == no_env / ".cache" / "vaelink"


def test_cache_dir_xdg(no_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vaelink"


def test_cache_dir_vaelink_home_wins(
    no_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path / "vl"))
    assert cache_dir() == tmp_path / "vl"  # no "vaelink" appended: it is vaelink's own folder
    assert export_dir("sdxl") == tmp_path / "vl" / "exports" / "sdxl"


def test_empty_variables_are_ignored(no_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAELINK_HOME", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache_dir() == no_env / ".cache" / "vaelink"


def test_sha256_file(tmp_path: Path) -> None:
    for size in (0, 1, (1 << 20) - 1, (1 << 20) + 12345):  # around the read chunk size
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def make_export(folder: Path, name: str = "sd15", files: dict[str, bytes] | None = None) -> Path:
    """A folder with a manifest describing `files` as a float32 export (not real ONNX)."""
    files = files or {"encoder": b"encoder graph", "decoder": b"decoder graph" * 3}
    folder.mkdir(parents=True, exist_ok=True)
    parts = {}
    for part, data in files.items():
        (folder / f"{part}-float32.onnx").write_bytes(data)
        parts[part] = {
            "file": f"{part}-float32.onnx",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    manifest = Manifest(
        card=get_card(name),
        variants={"float32": parts},
        source={"location": "somewhere", "config": {"full_res_channels": 8}},
        exporter={"vaelink": "0.1.0"},
    )
    (folder / MANIFEST).write_text(manifest.to_json())
    return folder


def test_manifest_round_trip(tmp_path: Path) -> None:
    folder = make_export(tmp_path / "e")
    manifest = read_manifest(folder)
    assert manifest.card == get_card("sd15")
    assert manifest.variants["float32"]["decoder"]["bytes"] == len(b"decoder graph" * 3)
    assert manifest.source["location"] == "somewhere"
    assert manifest.exporter == {"vaelink": "0.1.0"}
    assert manifest.format_version == 1
    assert Manifest.from_json(manifest.to_json()) == manifest
    data = json.loads((folder / MANIFEST).read_text())
    assert data["card"]["scaling_factor"] == 0.18215 and data["format_version"] == 1


def test_changed_file_is_refused(tmp_path: Path) -> None:
    folder = make_export(tmp_path / "e")
    (folder / "encoder-float32.onnx").write_bytes(b"encoder grapH")  # same size
    with pytest.raises(CorruptExportError, match=r"encoder-float32\.onnx does not match"):
        read_manifest(folder)
    read_manifest(folder, verify=False)  # not checked when not asked to


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    folder = make_export(tmp_path / "e")
    (folder / "decoder-float32.onnx").write_bytes(b"decoder")
    with pytest.raises(CorruptExportError, match="export the model again"):
        read_manifest(folder)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    folder = make_export(tmp_path / "e")
    (folder / "decoder-float32.onnx").unlink()
    with pytest.raises(CorruptExportError, match=r"decoder-float32\.onnx is missing"):
        read_manifest(folder)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(CorruptExportError, match=r"no manifest\.json"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        "[]",
        '"a string"',
        "{}",
        '{"format_version": 2}',
        '{"format_version": 1}',
        '{"format_version": 1, "card": {"name": "x"}, "variants": {}}',
    ],
)
def test_invalid_manifest(tmp_path: Path, text: str) -> None:
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(CorruptExportError):
        read_manifest(tmp_path)


def test_manifest_with_unknown_card_keys(tmp_path: Path) -> None:
    folder = make_export(tmp_path / "e")
    data = json.loads((folder / MANIFEST).read_text())
    data["card"]["from_the_future"] = True
    (folder / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(CorruptExportError, match="from_the_future"):
        read_manifest(folder)


def test_manifest_with_incomplete_file_entries(tmp_path: Path) -> None:
    folder = make_export(tmp_path / "e")
    data = json.loads((folder / MANIFEST).read_text())
    del data["variants"]["float32"]["encoder"]["sha256"]
    (folder / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(CorruptExportError):
        read_manifest(folder)


def test_find_export_in_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))
    folder = make_export(tmp_path / "exports" / "sdxl", "sdxl")
    assert find_export("sdxl") == folder
    assert read_manifest(find_export("sdxl")).card.scaling_factor == 0.13025


def test_find_export_follows_xdg(no_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = make_export(tmp_path / "xdg" / "vaelink" / "exports" / "taesd", "taesd")
    assert find_export("taesd") == folder


def test_find_export_not_exported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))
    (tmp_path / "exports" / "flux1").mkdir(parents=True)  # a folder, but no manifest
    with pytest.raises(ModelNotExportedError) as info:
        find_export("flux1")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, VaelinkError)
    message = str(info.value)
    assert "`vaelink export flux1`" in message
    assert "black-forest-labs/FLUX.1-schnell" in message


def test_find_export_unknown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))
    with pytest.raises(UnknownModelError, match=r"known models: .*sd15"):
        find_export("sd9")


# -- resolve_model: the one meaning of a model argument -------------------------------------------


def test_a_name_resolves_to_its_card_and_export(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))
    assert resolve_model("sdxl") == Model(get_card("sdxl"), None), "a card, not exported here"
    folder = make_export(tmp_path / "exports" / "sdxl", "sdxl")
    model = resolve_model("sdxl")
    assert model == Model(get_card("sdxl"), folder) and model.export_folder() == folder
    assert resolve_model(model) is model


def test_a_folder_resolves_to_its_manifests_card(tmp_path: Path) -> None:
    folder = make_export(tmp_path / "anywhere", "flux1")
    for given in (folder, str(folder)):
        assert resolve_model(given) == Model(get_card("flux1"), folder)


def test_the_bundled_model_resolves_offline(no_env: Path) -> None:
    model = resolve_model("vaelink-tiny")
    assert model.card == get_card("vaelink-tiny") and model.folder is not None
    assert read_manifest(model.export_folder()).card == model.card


def test_a_missing_export_is_named_only_when_it_is_needed(no_env: Path) -> None:
    model = resolve_model("sd3")  # fine for a remote endpoint: only the card is needed
    with pytest.raises(ModelNotExportedError, match="`vaelink export sd3`"):
        model.export_folder()
    with pytest.raises(UnknownModelError):
        resolve_model("no-such-model")


# -- exports known only by name, and what a manifest may list --------------------------------------


def _custom(folder: Path, name: str, **changes: object) -> Path:
    """An export whose manifest's card is `sd15`'s renamed (and changed): a custom VAE."""
    import dataclasses

    make_export(folder)
    manifest = read_manifest(folder)
    manifest.card = dataclasses.replace(manifest.card, name=name, **changes)  # type: ignore[arg-type]
    (folder / MANIFEST).write_text(manifest.to_json())
    return folder


def test_a_name_no_card_has_resolves_to_its_export(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from vaelink.exports import list_exports

    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))
    with pytest.raises(UnknownModelError):
        resolve_model("my-vae")
    folder = _custom(tmp_path / "exports" / "my-vae", "my-vae", scaling_factor=0.5)
    model = resolve_model("my-vae")
    assert model.folder == folder and model.card.name == "my-vae"
    assert model.card.scaling_factor == 0.5
    assert find_export("my-vae") == folder
    make_export(tmp_path / "exports" / "sdxl", "sdxl")
    (tmp_path / "exports" / "broken").mkdir()  # no manifest: not an export
    assert [(card.name, path) for card, path in list_exports()] == [
        ("my-vae", folder),
        ("sdxl", tmp_path / "exports" / "sdxl"),
    ]


def test_a_card_name_resolves_to_its_exports_card(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An export of sd15 made from a source whose config states other constants: the export's."""
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))
    _custom(tmp_path / "exports" / "sd15", "sd15", scaling_factor=0.2)
    assert resolve_model("sd15").card.scaling_factor == 0.2
    assert get_card("sd15").scaling_factor == 0.18215  # the card itself is unchanged


def test_an_export_found_under_another_name_takes_that_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))
    _custom(tmp_path / "exports" / "renamed", "published-as")
    assert resolve_model("renamed").card.name == "renamed"


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 101, "spaces in"])
def test_names_that_cannot_be_folders(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from vaelink.exports import check_name

    monkeypatch.setenv("VAELINK_HOME", str(tmp_path / "home"))
    _custom(tmp_path / "x", "x")  # what "../x" would reach from exports/
    # From a folder where no relative name reaches anything (a checkout at /tmp/x would be "../x").
    (tmp_path / "cwd" / "inner").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd" / "inner")
    with pytest.raises(VaelinkError, match="cannot name a model"):
        check_name(name)
    with pytest.raises(VaelinkError, match="cannot name a model"):
        export_dir(name)
    if name:
        with pytest.raises(UnknownModelError):
            resolve_model(name)


def test_data_files_are_verified_too(tmp_path: Path) -> None:
    folder = make_export(tmp_path / "e")
    manifest = read_manifest(folder)
    (folder / "weights.bin").write_bytes(b"external data")
    manifest.data_files = [
        {"file": "weights.bin", "bytes": 13, "sha256": sha256_file(folder / "weights.bin")}
    ]
    (folder / MANIFEST).write_text(manifest.to_json())
    assert read_manifest(folder).data_files == manifest.data_files
    (folder / "weights.bin").write_bytes(b"external dat!")
    with pytest.raises(CorruptExportError, match=r"weights\.bin does not match"):
        read_manifest(folder)


@pytest.mark.parametrize("file", ["../outside.onnx", "/etc/passwd"])
def test_a_manifest_cannot_list_files_outside_its_folder(tmp_path: Path, file: str) -> None:
    folder = make_export(tmp_path / "e")
    data = json.loads((folder / MANIFEST).read_text())
    data["variants"]["float32"]["encoder"]["file"] = file
    (folder / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(CorruptExportError, match="outside the export"):
        read_manifest(folder)
