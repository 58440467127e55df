"""An offline Hugging Face Hub for the tests: `HF_HOME` in a temporary folder, `HF_HUB_OFFLINE=1`, no
token, and repositories laid out in huggingface_hub's cache format by the tests themselves
(`models--org--name/{blobs, snapshots/<commit>, refs/main}`), so that `snapshot_download` and
`hf_hub_download` resolve them from the cache. Nothing here touches the network.

huggingface_hub reads its environment once, when it is first imported (diffusers imports it before
any test runs), so `offline_hub` sets the variables and patches its constants alike."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import huggingface_hub.constants
import pytest


def offline_hub(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """An empty, offline Hub cache under `root`; returns the cache folder (`HF_HOME/hub`)."""
    home = root / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(variable, raising=False)
    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    return cache


def hub_repo(
    cache: Path, repo_id: str, files: Mapping[str, bytes | Path], revision: str = "main"
) -> str:
    """Lays out `repo_id` at one commit holding `files` (path in the repo -> content, or a file to
    take it from) in the Hub cache `cache`, as huggingface_hub would have downloaded it: content in
    `blobs/`, the commit's tree of relative links in `snapshots/<commit>/`, `refs/<revision>`.
    Returns the commit hash."""
    contents = {
        path: data if isinstance(data, bytes) else Path(data).read_bytes()
        for path, data in files.items()
    }
    digest = hashlib.sha1()
    for path in sorted(contents):
        digest.update(path.encode() + b"\0" + hashlib.sha256(contents[path]).digest())
    commit = digest.hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path, content in contents.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


def folder_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    """Every file under `folder`, by its path relative to it (under `prefix` in a repo)."""
    return {
        prefix + path.relative_to(folder).as_posix(): path
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
