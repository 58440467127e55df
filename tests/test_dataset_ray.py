"""`encode_dataset(..., ray=True)` / `vaelink dataset --ray` on a local Ray cluster started here:
the same rows as the local run (every column, byte for byte), the same manifest, and resumable
by vaelink's own manifest (a deleted shard: only its rows are encoded again)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from dataset_fixtures import SETTINGS, assert_bad_listed, photo_files, rows_by_id, write_tree

from vaelink.cli import main
from vaelink.dataset import encode_dataset
from vaelink.dataset.distributed import _resources

CPUS = 2


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A local cluster of two CPUs, for this module. Its session folder is short (Ray's socket
    paths must fit in 107 bytes) and removed afterwards; token authentication off; no dashboard."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", str(folder))
        env.setenv("RAY_AUTH_MODE", "disabled")
        env.delenv("RAY_ADDRESS", raising=False)
        ray.init(
            num_cpus=CPUS,
            include_dashboard=False,
            _temp_dir=str(folder),
            log_to_driver=False,
        )
        try:
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, np.ndarray]) -> Any:
    """The photo tree and the local run's report and rows."""
    root = tmp_path_factory.mktemp("dataset-ray")
    src = write_tree(root / "src", photo_files(photos))
    report = encode_dataset(src, root / "local", batch_size=3, shard_size=4, **SETTINGS)
    return src, report, rows_by_id(report.folder)


def test_actors_leave_a_cpu_to_ray_data(cluster):
    for actors in (None, 1, 2):
        count, resources, threads = _resources(cluster, actors)
        assert count == (actors or 1) and threads >= 1
        assert "num_gpus" not in resources  # no GPU here: CPU shares
        assert count * resources["num_cpus"] <= CPUS - 1


@pytest.fixture(scope="module")
def on_ray(cluster: Any, local: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The same run on the cluster (once: each run starts its actor, a few seconds)."""
    src, _, _ = local
    out = tmp_path_factory.mktemp("dataset-ray") / "out"
    return encode_dataset(src, out, ray=True, batch_size=3, shard_size=4, **SETTINGS)


def test_ray_run_gives_the_local_rows_and_manifest(on_ray, local):
    _, report, rows = local
    got = on_ray
    assert got.version == report.version
    assert (got.encoded, got.cached, got.rows) == (report.encoded, 0, report.rows)
    mine = rows_by_id(got.folder)
    assert sorted(mine) == sorted(rows)
    for key, row in mine.items():
        assert row == rows[key]  # every column: sha256, latents bytes, sizes, crop, ...
    manifest = json.loads((got.folder / "manifest.json").read_text())
    assert_bad_listed(manifest)
    assert manifest["rows"] == report.rows
    assert manifest["config"] == json.loads((report.folder / "manifest.json").read_text())["config"]
    assert all(s["rows"] <= 4 for s in manifest["shards"])


def test_ray_data_reads_the_shards_as_they_are(cluster, local):
    # The format is plain Parquet: Ray Data reads a cache without vaelink, rows and latents intact.
    _, report, rows = local
    dataset = cluster.data.read_parquet(str(report.folder / "data"))
    read = {(r["key"], r["flipped"]): r for r in dataset.take_all()}
    assert sorted(read) == sorted(rows) and len(read) == report.rows
    for key, row in read.items():
        assert bytes(row["latents"]) == rows[key]["latents"]
        assert row["sha256"] == rows[key]["sha256"]


def test_ray_rerun_encodes_only_a_deleted_shard(on_ray, local, tmp_path, capsys):
    src, report, rows = local
    out = shutil.copytree(on_ray.out, tmp_path / "out")
    folder = out / on_ray.version
    shards = sorted((folder / "data").glob("shard-*.parquet"))
    assert len(shards) >= 3
    lost = _ids(shards[1])
    shards[1].unlink()
    argv = ["dataset", str(src), "-o", str(out), "--resolution", "128", "--step", "32"]
    assert main([*argv, "--flip", "--batch-size", "3", "--shard-size", "4", "-q", "--ray"]) == 0
    assert f"encoded {len(lost)}," in capsys.readouterr().out
    assert rows_by_id(folder) == rows
    # And the local run agrees that nothing is missing: one manifest, whichever way it ran.
    again = encode_dataset(src, out, batch_size=3, shard_size=4, **SETTINGS)
    assert (again.encoded, again.rows) == (0, report.rows)
    runs = json.loads((folder / "manifest.json").read_text())["runs"]
    assert [r["encoded"] for r in runs] == [report.encoded, len(lost), 0]


def _ids(shard: Path) -> set[tuple[str, bool]]:
    import pyarrow.parquet as pq

    table = pq.read_table(shard, columns=["key", "flipped"])
    return set(zip(table["key"].to_pylist(), table["flipped"].to_pylist(), strict=True))
