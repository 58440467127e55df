"""The Hugging Face Hub: every use of `huggingface_hub` in vaelink, imported only when called.

Files come through huggingface_hub's own cache (`HF_HOME`, `HF_HUB_CACHE`), with its login (the
saved token or `HF_TOKEN`), its offline mode (`HF_HUB_OFFLINE=1`: what the cache holds) and its
progress bars. `download` fetches some files of a repo (`vaelink export` takes a VAE's config, then
its weights); `pull` fetches a vaelink export published on the Hub, verifies it against its
manifest and makes it usable by name; `push` publishes one."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import HubError, VaelinkError
from .exports import (
    MANIFEST,
    check_name,
    export_dir,
    manifest_files,
    read_manifest,
    remove_path,
    replace_path,
)

__all__ = ["download", "pull", "push"]


def _hf() -> Any:
    try:
        return importlib.import_module("huggingface_hub")
    except ImportError:
        raise VaelinkError(
            "the Hugging Face Hub needs huggingface_hub: pip install 'vaelink[hub]'"
        ) from None


@contextlib.contextmanager
def _hub_errors(
    repo_id: str, revision: str | None = None, file: str | None = None
) -> Iterator[None]:
    """huggingface_hub's failures in the block (fetching `file`, or files, of the repo) as one
    `HubError` sentence."""
    errors = importlib.import_module("huggingface_hub.errors")
    at = f"{repo_id}@{revision}" if revision else repo_id
    at = f"{file} of {at}" if file else at
    try:
        yield
        return
    except errors.GatedRepoError:
        message = f"{repo_id} is gated: accept its terms on huggingface.co, then log in"
    except errors.RepositoryNotFoundError:
        message = (
            f"{repo_id} is not a repository on the Hub, or a private one: log in "
            "(`hf auth login`) or set HF_TOKEN"
        )
    except errors.RevisionNotFoundError:
        message = f"{repo_id} has no revision {revision!r}"
    except errors.LocalEntryNotFoundError:  # before EntryNotFoundError: a subclass of it
        offline = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
        message = f"{offline} and the Hugging Face cache does not hold {at}"
    except errors.EntryNotFoundError as e:
        message = f"{at} lacks a file vaelink needs ({_first_line(e)})"
    except errors.HfHubHTTPError as e:
        message = f"the Hub refused {at}: {_first_line(e)}"
    except errors.HFValidationError as e:
        message = f"{repo_id!r} is not a Hub repository id: {_first_line(e)}"
    except OSError as e:  # the network, the cache's disk
        message = f"cannot get {at} from the Hub: {e}"
    raise HubError(message)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _offline() -> bool:
    return bool(_hf().constants.HF_HUB_OFFLINE)


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"vaelink: {message}", file=sys.stderr, flush=True)


def download(
    repo_id: str, patterns: Sequence[str], *, revision: str | None = None, quiet: bool = False
) -> Path:
    """The files of `repo_id` matching `patterns`, through the Hugging Face cache: returns the
    snapshot folder (named after the commit). Files that the repo lacks are simply absent."""
    hf = _hf()
    _say(f"fetching {', '.join(patterns)} of {repo_id} from the Hugging Face Hub", quiet)
    with _hub_errors(repo_id, revision):
        folder = hf.snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns))
    return Path(folder)


def pull(
    repo_id: str, *, revision: str | None = None, name: str | None = None, quiet: bool = False
) -> Path:
    """Fetches the vaelink export published as `repo_id` (its manifest, then the files it lists)
    through the Hugging Face cache, verifies every file against the manifest, and makes it usable
    as `name` (default: its card's name) - `VAE(name)`, `vaelink serve --model name`, no torch.

    The export's folder in vaelink's cache is a link to the Hub cache's snapshot (no second copy;
    a copy where links cannot be made). Returns that folder."""
    hf = _hf()
    _say(f"pulling {repo_id} from the Hugging Face Hub", quiet)
    with _hub_errors(repo_id, revision, MANIFEST):
        manifest_path = hf.hf_hub_download(repo_id, MANIFEST, revision=revision)
    listed = read_manifest(Path(manifest_path).parent, verify=False)
    snapshot = download(repo_id, [MANIFEST, *manifest_files(listed)], revision=revision, quiet=True)
    manifest = read_manifest(snapshot, verify=True)  # every file, size and SHA-256
    target = export_dir(check_name(name or manifest.card.name))
    target.parent.mkdir(parents=True, exist_ok=True)
    link = target.parent / f".{target.name}-pull"
    remove_path(link)  # a leftover of an interrupted pull
    try:
        os.symlink(snapshot.resolve(), link, target_is_directory=True)
    except OSError:  # no links here (some Windows setups): a copy of the files
        _copy_export(snapshot, link, [MANIFEST, *manifest_files(manifest)])
    replace_path(link, target)
    _say(f"pulled {repo_id} ({snapshot.name[:12]}) as {target.name}: {target}", quiet)
    return target


def _copy_export(src: Path, dst: Path, files: Sequence[str]) -> None:
    for file in files:
        (dst / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / file, dst / file)


def push(
    folder: Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    quiet: bool = False,
) -> str:
    """Publishes the export in `folder` (verified first) as the Hub model repo `repo_id`, created if
    needed, with the login of huggingface_hub; only the manifest and the files it lists are
    uploaded. Returns the commit's URL."""
    hf = _hf()
    manifest = read_manifest(Path(folder), verify=True)
    api = hf.HfApi()
    _say(f"publishing {folder} as {repo_id} on the Hugging Face Hub", quiet)
    with _hub_errors(repo_id, revision):
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            allow_patterns=[MANIFEST, *manifest_files(manifest)],
            commit_message=f"vaelink export of {manifest.card.name}",
        )
    return str(getattr(commit, "commit_url", None) or commit)
