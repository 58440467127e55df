"""`vaelink.dataset`: real photos under several names and sizes, encoded by the bundled model into
Parquet shards; rows equal `vaelink.encode` of the same preprocessed image; runs killed with
SIGKILL at random points and resumed until done hold every item exactly once; an edited file is
re-encoded and its stale rows retired; bad inputs are skipped and listed."""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import shutil
import subprocess
import sys
import tarfile
import textwrap
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from conftest import pil_encode
from dataset_fixtures import (
    BAD,
    SETTINGS,
    assert_bad_listed,
    expected_pixels,
    latents_of,
    photo_files,
    rows_by_id,
    write_tree,
)
from PIL import Image

import vaelink
from vaelink.cli import main
from vaelink.dataset import BucketSpec, LatentDataset, encode_dataset
from vaelink.dataset.buckets import place


@pytest.fixture(scope="module")
def files(photos: dict[str, np.ndarray]) -> dict[str, bytes]:
    return photo_files(photos)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, files: dict[str, bytes]) -> Any:
    """One uninterrupted run over the photo tree: its report and its rows by (key, flipped)."""
    root = tmp_path_factory.mktemp("dataset")
    src = write_tree(root / "src", files)
    report = encode_dataset(src, root / "out", batch_size=3, shard_size=4, **SETTINGS)
    return report, rows_by_id(report.folder), src


def test_rows_equal_encode_of_the_preprocessed_image(reference, files):
    report, rows, _ = reference
    good = [k for k in files if k not in BAD]
    assert sorted(rows) == sorted((k, f) for k in good for f in (False, True))
    assert report.encoded == len(rows) == report.rows == 2 * len(good)
    buckets = BucketSpec(128, 32).buckets()
    for (key, _), row in rows.items():
        data = files[key]
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["format"] == "vaelink-dataset/1" and row["version"] == report.version
        assert (row["model"], row["kind"], row["dtype"]) == ("vaelink-tiny", "mean", "float32")
        assert json.loads(row["preprocess"])["resolution"] == 128
        h, w = row["original_size"]
        assert Image.open(io.BytesIO(data)).size == (w, h)
        th, tw = row["target_size"]
        assert (tw, th) in buckets and th * tw <= 128 * 128
        left, top, right, bottom = row["crop_box"]
        assert (right - left, bottom - top) == (tw, th)
        rh, rw = row["resized_size"]
        assert left >= 0 and top >= 0 and right <= rw and bottom <= rh
        # The bucket nearest in aspect ratio, covered without distortion beyond rounding.
        ratio = math.log(w / h)
        best = min(abs(math.log(bw / bh) - ratio) for bw, bh in buckets)
        assert abs(math.log(tw / th) - ratio) == pytest.approx(best)
        assert abs(rw / rh - w / h) <= 0.02 * (w / h)
        expected = vaelink.encode(expected_pixels(data, row))[0]
        np.testing.assert_allclose(latents_of(row), expected, rtol=0, atol=1e-5)
    # Same bytes under two names: the same latents; a flip is not the same latents.
    a, b = rows[("astronaut.jpg", False)], rows[("copies/astronaut.jpg", False)]
    assert a["latents"] == b["latents"]
    assert a["latents"] != rows[("astronaut.jpg", True)]["latents"]


def test_bad_inputs_are_listed_in_the_manifest_and_strict_fails(reference, tmp_path, capsys):
    report, _, src = reference
    manifest = json.loads((report.folder / "manifest.json").read_text())
    assert_bad_listed(manifest)
    assert manifest["rows"] == report.rows
    assert sum(s["rows"] for s in manifest["shards"]) == report.rows
    top = json.loads((report.out / "manifest.json").read_text())
    assert top["current"] == report.version
    assert top["versions"][report.version]["model"] == "vaelink-tiny"
    argv = ["dataset", str(src), "-o", str(tmp_path / "out"), "--resolution", "128"]
    argv += ["--step", "32", "--flip", "-q"]
    assert main(argv) == 0  # bad inputs alone do not fail the run...
    assert main([*argv, "--strict"]) == 1  # ...unless asked
    err = capsys.readouterr().err
    assert all(f"skipped {key}" in err for key in BAD)


def test_latent_dataset_reads_arrays_and_torch(reference):
    report, rows, _ = reference
    dataset = LatentDataset(report.out)
    assert len(dataset) == len(rows)
    seen = set()
    for i in range(len(dataset)):
        item = dataset[i]
        row = rows[(item["key"], item["flipped"])]
        np.testing.assert_array_equal(item["latents"], latents_of(row))
        left, top = row["crop_box"][:2]
        assert item["crop_top_left"] == (top, left)
        assert item["original_size"] == tuple(row["original_size"])
        seen.add((item["key"], item["flipped"]))
    assert len(seen) == len(rows)
    buckets = dataset.buckets()
    assert sum(map(len, buckets.values())) == len(dataset)
    assert all(dataset[i]["target_size"] == size for size, ix in buckets.items() for i in ix)
    torch = pytest.importorskip("torch")
    tensor = LatentDataset(report.out, output="torch")[0]["latents"]
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_array_equal(tensor.numpy(), dataset[0]["latents"])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


KILLER = textwrap.dedent(
    """
    import os, random, signal, sys
    from vaelink.dataset import encode_dataset
    # SIGKILL ourselves at a random rename: just before it (a temp file left behind) or just
    # after it (a shard in place, nothing else updated): the two sides of every commit point.
    calls, target, after = 0, int(sys.argv[3]), sys.argv[4] == "after"
    real = os.replace
    def replace(a, b):
        global calls
        calls += 1
        if calls == target and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        real(a, b)
        if calls == target and after:
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    encode_dataset(sys.argv[1], sys.argv[2], resolution=128, step=32, flip=True,
                   progress=False, batch_size=2, shard_size=1, threads=2)
    """
)


def test_killed_at_random_points_then_resumed_holds_every_item_once(reference, tmp_path):
    report, rows, src = reference
    out = tmp_path / "out"
    rng = random.Random(20240611)
    kills, resumed_with_rows = 0, 0
    for attempt in range(12):
        had = len(list(out.glob("*/data/shard-*.parquet")))
        resumed_with_rows += had > 0
        # Renames: the top manifest, then one per shard (a row each), then the version manifest:
        # 4 runs killed within their first 4 renames (3 rows at most each: 14 to do), one
        # killed from outside at a random moment (maybe mid-write), then runs left alone.
        target, side = rng.randint(1, 4), rng.choice(["before", "after"])
        if attempt == 4:
            target = 0
        elif attempt > 4:
            target = 10**6
        args = [sys.executable, "-c", KILLER, str(src), str(out), str(target), side]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if target == 0:
            try:
                process.wait(timeout=rng.uniform(2.0, 5.0))
            except subprocess.TimeoutExpired:
                process.kill()  # SIGKILL
        _, stderr = process.communicate(timeout=120)
        if process.returncode == 0:
            break
        assert process.returncode == -9, stderr
        kills += 1
    else:
        # Draws past the last rename finish the run: reaching here means it never completed.
        pytest.fail("the run never completed")
    assert kills >= 4 and resumed_with_rows >= 3
    assert not list(out.glob("*/data/.*.tmp"))
    table = pq.read_table(out / report.version / "data")
    ids = list(zip(table["key"].to_pylist(), table["flipped"].to_pylist(), strict=True))
    assert sorted(ids) == sorted(rows)  # every item exactly once
    for row in table.to_pylist():
        assert row["latents"] == rows[(row["key"], row["flipped"])]["latents"]


def test_edited_file_is_reencoded_and_its_stale_rows_retired(reference, tmp_path, photos):
    _, rows, src = reference
    tree = shutil.copytree(src, tmp_path / "src")
    out = tmp_path / "out"
    first = encode_dataset(tree, out, batch_size=4, shard_size=5, **SETTINGS)
    again = encode_dataset(tree, out, batch_size=4, shard_size=5, **SETTINGS)
    assert (again.encoded, again.retired, again.cached) == (0, 0, len(rows) // 2)
    edited = pil_encode(photos["coffee"][::-1], "PNG")  # same name, new content
    (tree / "cats/chelsea.png").write_bytes(edited)
    third = encode_dataset(tree, out, batch_size=4, shard_size=5, **SETTINGS)
    assert (third.encoded, third.retired, third.rows) == (2, 2, first.rows)
    table = pq.read_table(first.folder / "data").to_pylist()
    mine = [r for r in table if r["key"] == "cats/chelsea.png"]
    assert sorted(r["flipped"] for r in mine) == [False, True]
    for row in mine:
        assert row["sha256"] == hashlib.sha256(edited).hexdigest()
        expected = vaelink.encode(expected_pixels(edited, row))[0]
        np.testing.assert_allclose(latents_of(row), expected, rtol=0, atol=1e-5)
    others = {(r["key"], r["flipped"]): r["latents"] for r in table if r["key"] != mine[0]["key"]}
    assert others == {k: r["latents"] for k, r in rows.items() if k[0] != "cats/chelsea.png"}
    # A setting that changes latents: a new version beside the old one, never mixed into it.
    half = encode_dataset(tree, out, dtype="float16", **SETTINGS)
    assert half.version != first.version and half.encoded == first.rows
    assert len(pq.read_table(first.folder / "data")) == first.rows
    latest, older = LatentDataset(out), LatentDataset(out, version=first.version)
    assert latest.version == half.version and latest[0]["latents"].dtype == np.float16
    assert older[0]["latents"].dtype == np.float32


def test_nonfinite_latents_are_retried_in_float32_and_reported(reference, tmp_path):
    _, rows, src = reference

    class FlakyVAE(vaelink.VAE):  # a float16 engine that overflowed on its first batch
        calls = 0

        def encode(self, images: Any, **options: Any) -> Any:
            out = np.array(super().encode(images, **options))
            FlakyVAE.calls += 1
            if FlakyVAE.calls == 1:
                out[0, 0, 0, 0] = np.nan
            return out

    report = encode_dataset(src, tmp_path / "out", vae=FlakyVAE(), batch_size=2, **SETTINGS)
    assert len(report.nonfinite) == 1 and report.nonfinite[0]["action"] == "float32"
    table = pq.read_table(report.folder / "data").to_pylist()
    assert len(table) == len(rows)
    for row in table:
        assert np.isfinite(latents_of(row)).all()
        assert row["latents"] == rows[(row["key"], row["flipped"])]["latents"]


def test_parquet_and_webdataset_shards_as_sources(reference, files, tmp_path):
    _, rows, _ = reference
    names = ["astronaut.jpg", "cats/chelsea.png", "coffee-small.jpg"]
    # Hugging Face's Image feature is a struct of bytes and path.
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "file_name": names,
            "image": pa.array([{"bytes": files[n], "path": n} for n in names], image),
        }
    )
    pq.write_table(table, tmp_path / "train-0.parquet")
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for n in names:
            info = tarfile.TarInfo(n)
            info.size = len(files[n])
            tar.addfile(info, io.BytesIO(files[n]))
    for src, prefix in (
        (tmp_path / "train-0.parquet", ""),
        (tmp_path / "shard-0.tar", "shard-0.tar/"),
    ):
        report = encode_dataset(src, tmp_path / src.stem, **SETTINGS)
        got = pq.read_table(report.folder / "data").to_pylist()
        assert sorted((r["key"], r["flipped"]) for r in got) == sorted(
            (prefix + n, f) for n in names for f in (False, True)
        )
        for row in got:
            assert row["latents"] == rows[(row["key"][len(prefix) :], row["flipped"])]["latents"]


def test_sdxl_buckets_and_no_upscale():
    buckets = BucketSpec(1024, 64).buckets()
    # The buckets of the SDXL paper's appendix, among others.
    for bucket in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (1536, 640)]:
        assert bucket in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024**2 for w, h in buckets)
    small = BucketSpec(1024, 64, no_upscale=True)
    p = place(small, small.buckets(), 300, 200)
    assert p.resized_size == (200, 300) and p.target_size == (192, 256)
    assert p.crop_box == (22, 4, 278, 196)
    big = place(BucketSpec(1024, 64), buckets, 300, 200)
    assert big.resized_size[0] > 200  # without the option it is upscaled
    stretched = place(BucketSpec(1024, 64, mode="resize"), buckets, 2000, 1000)
    assert stretched.crop_box == (0, 0, *stretched.target_size[::-1])
    assert stretched.resized_size == stretched.target_size


def test_endpoints_share_the_work_and_give_the_same_rows(reference, tmp_path):
    """Three endpoints - one down, a `vaelink serve`, the local engine - one encoding thread
    each, every thread falling back along the whole list: every row as the local run's."""
    from client_fixtures import closed_port_url
    from server_fixtures import LiveServer, metric_sum, parse_metrics

    from vaelink.engine import Engine
    from vaelink.server.app import create_app
    from vaelink.server.batching import Batching

    _, rows, src = reference
    app = create_app({"vaelink-tiny": Engine("vaelink-tiny")}, batching=Batching(enabled=False))
    with LiveServer(app) as server:
        endpoints = [closed_port_url(), server.url, "local"]
        report = encode_dataset(src, tmp_path / "out", endpoint=endpoints, batch_size=2, **SETTINGS)
        metrics = parse_metrics(requests.get(f"{server.url}/metrics", timeout=10).text)
    # Batches go to the longest-idle thread: the first two start at the server (the first after
    # the dead endpoint), the third at the local engine - both took part.
    served = metric_sum(metrics, "vaelink_batch_images_sum", op="encode")
    table = pq.read_table(report.folder / "data").to_pylist()
    assert len(table) == len(rows) and 1 <= served < len(rows)
    for row in table:
        assert row["latents"] == rows[(row["key"], row["flipped"])]["latents"]


def test_hugging_face_datasets_source(reference, files, tmp_path):
    datasets = pytest.importorskip("datasets")
    _, rows, _ = reference
    names = ["astronaut.jpg", "cats/tall/chelsea-tall.webp"]
    image = datasets.Image()
    table = datasets.Dataset.from_dict(
        {"file_name": names, "image": [{"bytes": files[n], "path": None} for n in names]},
        features=datasets.Features({"file_name": datasets.Value("string"), "image": image}),
    )
    table.save_to_disk(str(tmp_path / "saved"))
    for src in (table, tmp_path / "saved"):  # the object, and a save_to_disk folder
        report = encode_dataset(src, tmp_path / "out", **SETTINGS)
        got = pq.read_table(report.folder / "data").to_pylist()
        assert sorted((r["key"], r["flipped"]) for r in got) == sorted(
            (n, f) for n in names for f in (False, True)
        )
        for row in got:
            assert row["latents"] == rows[(row["key"], row["flipped"])]["latents"]
    assert report.encoded == 0 and report.cached == 2  # the second source: the same bytes
    # And the shards load as a plain Parquet dataset.
    loaded = datasets.load_dataset(
        "parquet",
        data_files=str(report.folder / "data" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert sorted(loaded["key"]) == sorted(n for n in names for _ in range(2))
