"""`vaelink.hub`: files through the Hugging Face cache, offline (`HF_HUB_OFFLINE=1`, `HF_HOME` in a
temporary folder) against repositories the tests lay out in the cache; `pull` of a published export
(verified, usable by name, also in a process where torch cannot be imported); `push` against a
recorder in place of the upload, never the network."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import engine_fixtures as ef
import huggingface_hub
import numpy as np
import pytest
from hub_fixtures import folder_files, hub_repo, offline_hub

import vaelink
from vaelink import hub
from vaelink.engine import Engine
from vaelink.errors import CorruptExportError, HubError, VaelinkError
from vaelink.exports import MANIFEST, export_dir, read_manifest, resolve_model


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with ef.one_torch_thread():
        yield


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An offline Hub cache, and an empty vaelink cache."""
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path / "vaelink-home"))
    return offline_hub(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def taesd(tmp_path_factory: pytest.TempPathFactory) -> ef.Exported:
    return ef.exported("taesd-like", tmp_path_factory)


@pytest.fixture
def published(cache: Path, taesd: ef.Exported) -> str:
    """The tiny taesd-like export, published as `someone/tiny-taesd` (and a README beside it)."""
    files: dict[str, bytes | Path] = {**folder_files(taesd.folder), "README.md": b"# hi\n"}
    return hub_repo(cache, "someone/tiny-taesd", files)


def test_download_resolves_from_the_cache_offline(cache: Path) -> None:
    commit = hub_repo(cache, "org/vae", {"config.json": b"{}", "vae/config.json": b"[]"})
    folder = hub.download("org/vae", ["config.json"], quiet=True)
    assert folder == cache / "models--org--vae" / "snapshots" / commit
    assert (folder / "config.json").read_bytes() == b"{}"


@pytest.mark.parametrize("repo", ["org/absent", "org/vae@nope"])
def test_download_of_what_the_cache_lacks_is_one_hub_error(cache: Path, repo: str) -> None:
    hub_repo(cache, "org/vae", {"config.json": b"{}"})
    repo_id, _, revision = repo.partition("@")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and the Hugging Face cache") as e:
        hub.download(repo_id, ["config.json"], revision=revision or None, quiet=True)
    assert repo_id in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("RepositoryNotFoundError", "is not a repository on the Hub, or a private one"),
        ("GatedRepoError", "is gated"),
        ("RevisionNotFoundError", "has no revision 'v2'"),
        ("HfHubHTTPError", "the Hub refused org/vae@v2: boom"),
    ],
)
def test_hub_failures_are_one_sentence(
    cache: Path, monkeypatch: pytest.MonkeyPatch, error: str, expected: str
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        response = SimpleNamespace(headers={}, request=None, status_code=404)
        raise getattr(huggingface_hub.errors, error)("boom\nmore lines", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(HubError, match=expected) as e:
        hub.download("org/vae", ["config.json"], revision="v2", quiet=True)
    assert "\n" not in str(e.value)


def test_a_bad_repo_id_is_a_hub_error(cache: Path) -> None:
    with pytest.raises(HubError, match="not a Hub repository id"):
        hub.download("not a/valid//id", ["config.json"], quiet=True)


def test_without_huggingface_hub_the_error_names_the_extra(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(VaelinkError, match=r"pip install 'vaelink\[hub\]'"):
        hub.pull("someone/tiny-taesd")


def test_pull_verifies_and_makes_the_export_usable_by_name(
    cache: Path, published: str, taesd: ef.Exported, photos: dict[str, np.ndarray]
) -> None:
    folder = hub.pull("someone/tiny-taesd", quiet=True)
    assert folder == export_dir("tiny-taesd")
    snapshot = cache / "models--someone--tiny-taesd" / "snapshots" / published
    assert folder.resolve() == snapshot.resolve()  # a link into the Hub cache: no second copy
    assert read_manifest(folder).card == taesd.card
    model = resolve_model("tiny-taesd")  # no built-in card has this name
    assert model.card == taesd.card and model.folder == folder
    x = vaelink.preprocess(ef.photo_batch(photos["chelsea"], 1, 32, 32))
    engine = Engine("tiny-taesd", provider="cpu")
    latents = engine.encode(x)
    assert ef.rel_err(latents, taesd.encode(x)) <= 1e-4
    assert ef.rel_err(engine.decode(latents, output="float"), taesd.decode(latents)) <= 1e-4


def test_pull_fetches_only_what_the_manifest_lists(
    cache: Path, published: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[list[str]] = []
    download = huggingface_hub.snapshot_download

    def record(*args: Any, allow_patterns: list[str], **kwargs: Any) -> Any:
        asked.append(allow_patterns)
        return download(*args, allow_patterns=allow_patterns, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", record)
    hub.pull("someone/tiny-taesd", quiet=True)
    listed = json.loads((export_dir("tiny-taesd") / MANIFEST).read_text())
    files = {info["file"] for parts in listed["variants"].values() for info in parts.values()}
    assert len(asked) == 1 and asked[0][0] == MANIFEST and set(asked[0][1:]) == files
    assert len(files) == 4 and "README.md" not in asked[0]


def test_pull_under_another_name_and_again(cache: Path, published: str) -> None:
    folder = hub.pull("someone/tiny-taesd", name="mine", quiet=True)
    assert folder == export_dir("mine") and resolve_model("mine").card.name == "mine"
    assert hub.pull("someone/tiny-taesd", name="mine", quiet=True) == folder  # replaces the link
    assert sorted(p.name for p in folder.parent.iterdir()) == ["mine"]  # no leftovers
    with pytest.raises(VaelinkError, match="cannot name a model"):
        hub.pull("someone/tiny-taesd", name="../escape", quiet=True)


def test_pull_refuses_files_that_do_not_match_the_manifest(
    cache: Path, published: str, taesd: ef.Exported
) -> None:
    snapshot = cache / "models--someone--tiny-taesd" / "snapshots" / published
    graph = (snapshot / "decoder-float32.onnx").resolve()  # the blob
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(CorruptExportError, match=r"decoder-float32.onnx does not match"):
        hub.pull("someone/tiny-taesd", quiet=True)
    assert not export_dir("tiny-taesd").exists()


def test_pull_of_a_repo_that_is_no_export(cache: Path) -> None:
    hub_repo(cache, "org/diffusers-vae", {"config.json": b"{}"})
    with pytest.raises(HubError, match=r"does not hold manifest\.json of org/diffusers-vae"):
        hub.pull("org/diffusers-vae", quiet=True)


class Recorder:
    """`HfApi.create_repo` / `upload_folder` stand-ins: what would be published is laid out as that
    repo in the (offline) Hub cache, so that a pull can fetch it back."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, api: Any, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, api: Any, **kwargs: Any) -> Any:
        self.calls.append(("upload_folder", kwargs))
        files = {
            path: data
            for path, data in folder_files(Path(kwargs["folder_path"])).items()
            if any(fnmatch.fnmatch(path, p) for p in kwargs["allow_patterns"])
        }
        commit = hub_repo(self.cache, kwargs["repo_id"], files)
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{commit}",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid=commit,
        )


def _method(fn: Any) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(self, *args, **kwargs)

    return method


@pytest.fixture
def recorder(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """The upload's recorder in place of HfApi's methods."""
    recorder = Recorder(cache)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", _method(recorder.create_repo))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", _method(recorder.upload_folder))
    return recorder


def test_push_publishes_the_manifest_and_its_files_then_pull_gets_them_back(
    recorder: Recorder, taesd: ef.Exported, tmp_path: Path
) -> None:
    export = taesd.copy(tmp_path / "export")
    (export / "notes.txt").write_text("not part of the export\n")
    url = hub.push(export, "me/tiny", private=True, quiet=True)
    (name, created), (_, uploaded) = recorder.calls
    assert name == "create_repo" and created == {
        "repo_id": "me/tiny",
        "private": True,
        "exist_ok": True,
    }
    assert uploaded["repo_id"] == "me/tiny" and uploaded["folder_path"] == str(export)
    manifest = read_manifest(export)
    files = [info["file"] for parts in manifest.variants.values() for info in parts.values()]
    assert uploaded["allow_patterns"] == [MANIFEST, *files]
    assert uploaded["commit_message"] == f"vaelink export of {taesd.card.name}"
    assert url.startswith("https://huggingface.co/me/tiny/commit/")

    folder = hub.pull("me/tiny", name="round-trip", quiet=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, *files])
    for file in files:
        assert (folder / file).read_bytes() == (export / file).read_bytes()


def test_push_refuses_a_corrupt_export_before_uploading(
    recorder: Recorder, taesd: ef.Exported, tmp_path: Path
) -> None:
    export = taesd.copy(tmp_path / "export")
    (export / "encoder-float16.onnx").write_bytes(b"changed")
    with pytest.raises(CorruptExportError):
        hub.push(export, "me/tiny", quiet=True)
    assert recorder.calls == []


def test_the_hub_module_imports_huggingface_hub_only_when_called() -> None:
    code = "import sys, vaelink, vaelink.hub, vaelink.cli; print('huggingface_hub' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_vaelink_pull_then_serve_it_without_torch(
    cache: Path, published: str, tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    """A fresh process where torch cannot be imported, configured by the environment alone
    (HF_HOME, HF_HUB_OFFLINE, VAELINK_HOME): `vaelink pull`, then the model by name."""
    image = tmp_path / "cat.png"
    image.write_bytes(vaelink.encode_image(photos["chelsea"][:32, :32], "png"))
    script = (
        "import sys; sys.modules['torch'] = None\n"  # `import torch` raises ImportError
        "from vaelink.cli import main\n"
        "code = main(['pull', 'someone/tiny-taesd', '--name', 'served'])\n"
        "import vaelink\n"
        f"z = vaelink.VAE('served').encode({str(image)!r})\n"
        "print(code, tuple(z.shape))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "0 (1, 4, 8, 8)", done.stdout
    assert "pulled someone/tiny-taesd as served" in done.stdout
