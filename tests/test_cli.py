"""`vaelink encode` / `vaelink decode`: image files -> one latents file -> image files, locally and
through `vaelink serve`, with unreadable inputs reported and skipped (and a non-zero exit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from client_fixtures import closed_port_url
from engine_fixtures import one_torch_thread

import vaelink
from vaelink.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture
def inputs(tmp_path: Path, photos) -> dict[str, Path]:
    """Two readable images of different sizes (one not a multiple of 8), and two that are not."""
    folder = tmp_path / "in"
    folder.mkdir()
    files = {
        "cat": folder / "cat.png",
        "astronaut": folder / "astronaut.jpg",
        "notes": folder / "notes.txt",
        "cut": folder / "cut.png",
    }
    files["cat"].write_bytes(vaelink.encode_image(photos["chelsea"][:61, :90], "png"))
    files["astronaut"].write_bytes(vaelink.encode_image(photos["astronaut"][:64, :48], "jpeg"))
    files["notes"].write_text("not an image\n")
    files["cut"].write_bytes(vaelink.encode_image(photos["coffee"][:64, :64], "png")[:200])
    return files


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_encode_reports_and_skips_unreadable_files(sdxl, inputs, tmp_path, capsys):
    out = tmp_path / "latents.safetensors"
    missing = tmp_path / "in" / "missing.png"
    files = [inputs["cat"], inputs["notes"], inputs["astronaut"], missing, inputs["cut"]]
    code, err = run(capsys, "encode", *files, "-o", out, "--model", sdxl.folder)
    assert code == 1
    for bad in (inputs["notes"], missing, inputs["cut"]):
        assert f"vaelink: skipped {bad}: " in err
    assert "encoded 2 of 5 images" in err and "3 skipped" in err
    tensors, metadata = vaelink.load_latents(out)
    assert list(tensors) == ["latents.0", "latents.1"]
    assert metadata["model"] == "sdxl" and metadata["format"] == "vaelink-latents/1"
    assert json.loads(metadata["files"]) == [str(inputs["cat"]), str(inputs["astronaut"])]
    assert json.loads(metadata["sizes"]) == [[90, 61], [48, 64]]
    assert float(metadata["scaling_factor"]) == 0.13025
    local = vaelink.VAE(sdxl.folder)
    assert np.array_equal(tensors["latents.0"], local.encode(inputs["cat"]))
    assert tensors["latents.0"].shape == (1, 4, 7, 11)  # 61x90 cropped to 56x88
    assert np.array_equal(tensors["latents.1"], local.encode(inputs["astronaut"]))


def test_encode_takes_folders_recursively(sdxl, inputs, tmp_path, capsys):
    nested = tmp_path / "in" / "more" / "deeper"
    nested.mkdir(parents=True)
    (nested / "cat2.PNG").write_bytes(inputs["cat"].read_bytes())
    out = tmp_path / "latents.safetensors"
    code, err = run(capsys, "encode", tmp_path / "in", "-o", out, "--model", sdxl.folder)
    assert code == 1  # cut.png is an image by name, and cut: reported; notes.txt is not looked at
    assert f"vaelink: skipped {inputs['cut']}: " in err and "notes.txt" not in err
    tensors, metadata = vaelink.load_latents(out)
    files = [str(inputs["astronaut"]), str(inputs["cat"]), str(nested / "cat2.PNG")]
    assert json.loads(metadata["files"]) == files  # sorted, the nested folder's too
    assert metadata["complete"] == "true"
    np.testing.assert_array_equal(tensors["latents.1"], tensors["latents.2"])
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run(capsys, "encode", empty, "-o", tmp_path / "none.safetensors")
    assert code == 1 and f"no images found in {empty}" in err


def test_encode_with_a_dead_endpoint_says_so_once(sdxl, inputs, tmp_path, capsys):
    out = tmp_path / "latents.safetensors"
    files = [inputs["cat"], inputs["astronaut"], inputs["cat"], inputs["astronaut"]]
    dead = ["--endpoint", closed_port_url(), "--retries", "0", "-j", "2"]
    code, err = run(capsys, "encode", *files, "-o", out, "--model", sdxl.folder, *dead)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaelink: error: "), lines
    assert not out.exists()  # nothing was encoded: nothing written


def test_encode_warns_once_per_truncated_jpeg_or_skips_it_when_strict(
    sdxl, inputs, tmp_path, capsys
):
    whole = inputs["astronaut"].read_bytes()
    cuts = [tmp_path / "in" / f"cut{i}.jpg" for i in range(2)]
    for path in cuts:
        path.write_bytes(whole[: len(whole) * 2 // 3])
    out = tmp_path / "latents.safetensors"
    code, err = run(capsys, "encode", *cuts, inputs["cat"], "-o", out, "--model", sdxl.folder)
    assert code == 0 and "encoded 3 of 3 images" in err
    for path in cuts:  # one line each, naming the file
        assert err.count(f"vaelink: warning: {path}: truncated JPEG") == 1
    code, err = run(
        capsys, "encode", *cuts, inputs["cat"], "-o", out, "--model", sdxl.folder, "--strict"
    )
    assert code == 1 and "encoded 1 of 3 images" in err and "2 skipped" in err
    for path in cuts:
        assert f"vaelink: skipped {path}: truncated JPEG" in err


def test_encode_with_nothing_readable_fails_and_writes_nothing(sdxl, inputs, tmp_path, capsys):
    out = tmp_path / "latents.safetensors"
    code, err = run(capsys, "encode", inputs["notes"], "-o", out, "--model", sdxl.folder)
    assert code == 1 and "none of the 1 images was encoded" in err
    assert not out.exists()


def test_round_trip_locally_and_remotely(sdxl, server, inputs, tmp_path, capsys):
    images = [inputs["cat"], inputs["astronaut"]]
    local_file, remote_file = tmp_path / "local.safetensors", tmp_path / "remote.safetensors"
    model = ["--model", sdxl.folder]
    assert run(capsys, "encode", *images, "-o", local_file, *model)[0] == 0
    code, err = run(capsys, "encode", *images, "-o", remote_file, *model, "--endpoint", server.url)
    assert code == 0 and "encoded 2 of 2 images" in err
    local, _ = vaelink.load_latents(local_file)
    remote, _ = vaelink.load_latents(remote_file)
    assert local.keys() == remote.keys()
    assert all(np.array_equal(local[k], remote[k]) for k in local)

    here, there = tmp_path / "here", tmp_path / "there"
    assert run(capsys, "decode", local_file, "-o", here, *model)[0] == 0
    code, err = run(capsys, "decode", remote_file, "-o", there, *model, "--endpoint", server.url)
    assert code == 0 and "decoded 2 of 2 images" in err
    assert sorted(p.name for p in here.iterdir()) == ["astronaut.png", "cat.png"]
    vae = vaelink.VAE(sdxl.folder)
    for name, key in (("cat", "latents.0"), ("astronaut", "latents.1")):
        written = vaelink.decode_image(here / f"{name}.png")
        assert np.array_equal(written, vae.decode(local[key])[0])
        assert np.array_equal(vaelink.decode_image(there / f"{name}.png"), written)
    assert written.shape == (64, 48, 3)


def test_decode_formats_names_and_fallback(sdxl, inputs, tmp_path, capsys):
    latents_file = tmp_path / "latents.safetensors"
    same_stem = tmp_path / "in" / "cat.jpg"
    same_stem.write_bytes(inputs["astronaut"].read_bytes())
    run(capsys, "encode", inputs["cat"], same_stem, "-o", latents_file, "--model", sdxl.folder)
    out = tmp_path / "out"
    endpoints = ["--endpoint", closed_port_url(), "--endpoint", "local", "--retries", "0"]
    code, _ = run(capsys, "decode", latents_file, "-o", out, "--model", sdxl.folder, *endpoints,
                  "--format", "jpeg", "--quality", "80")  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["cat-1.jpg", "cat.jpg"]
    assert vaelink.probe_image(out / "cat.jpg").format == "jpeg"


def test_decode_reports_unreadable_latents_files(sdxl, tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    z = np.random.default_rng(0).standard_normal((2, 4, 8, 8), np.float32)
    vaelink.save_latents(good, {"latents": z, "odd": z[:1, :3]})  # not vaelink's: no metadata
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    out = tmp_path / "out"
    args = ("decode", broken, good, "-o", out, "--model", sdxl.folder)
    code, err = run(capsys, *args)
    assert code == 1
    assert f"vaelink: skipped {broken}: " in err
    assert "vaelink: skipped odd: " in err and "latents must be" in err  # 3 channels, not 4
    assert sorted(p.name for p in out.iterdir()) == ["latents-0.png", "latents-1.png"]
    assert "decoded 2 of 3 images" in err


def test_unknown_model_is_one_clear_error(inputs, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    code, err = run(capsys, "encode", inputs["cat"], "-o", out, "--model", "no-such-model")
    assert code == 1 and "unknown model 'no-such-model'" in err and err.count("\n") == 1


def test_the_command_line_entry_point(sdxl, inputs, tmp_path):
    out = tmp_path / "latents.safetensors"
    command = [sys.executable, "-m", "vaelink", "encode", str(inputs["cat"]), str(inputs["notes"])]
    command += ["-o", str(out), "--model", str(sdxl.folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"skipped {inputs['notes']}" in done.stderr
    assert "encoded 1 of 2 images" in done.stderr
    assert list(vaelink.load_latents(out)[0]) == ["latents.0"]
    help_text = subprocess.run(
        [sys.executable, "-m", "vaelink", "decode", "--help"], capture_output=True, text=True
    ).stdout
    assert "--endpoint" in help_text and "--format" in help_text


# -- vaelink pull / import / export: models by name ------------------------------------------------


@pytest.fixture
def hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    from hub_fixtures import offline_hub

    monkeypatch.setenv("VAELINK_HOME", str(tmp_path / "vaelink-home"))
    return offline_hub(monkeypatch, tmp_path)


def test_pull_then_encode_and_decode_by_the_pulled_name(sdxl, hub_cache, inputs, tmp_path, capsys):
    from hub_fixtures import folder_files, hub_repo

    hub_repo(hub_cache, "org/tiny-sdxl", folder_files(sdxl.folder))
    code = main(["pull", "org/tiny-sdxl", "--name", "my-sdxl"])
    assert code == 0 and "pulled org/tiny-sdxl as my-sdxl" in capsys.readouterr().out
    out = tmp_path / "latents.safetensors"
    code, err = run(capsys, "encode", inputs["cat"], "-o", out, "--model", "my-sdxl", "-q")
    assert code == 0, err
    tensors, metadata = vaelink.load_latents(out)
    assert metadata["model"] == "my-sdxl"
    expected = vaelink.VAE(sdxl.folder).encode(vaelink.decode_image(inputs["cat"]))
    np.testing.assert_array_equal(tensors["latents.0"], expected)
    code, err = run(
        capsys, "decode", out, "-o", tmp_path / "decoded", "-q"
    )  # the name, from the file
    assert code == 0 and (tmp_path / "decoded" / "cat.png").is_file(), err
    assert main(["models"]) == 0
    assert any(line.startswith("my-sdxl ") for line in capsys.readouterr().out.splitlines())


def test_pull_failures_are_one_line(hub_cache, capsys):
    code, err = run(capsys, "pull", "org/absent")
    progress, error = err.splitlines()
    assert code == 1 and progress == "vaelink: pulling org/absent from the Hugging Face Hub"
    assert error.startswith("vaelink: error: HF_HUB_OFFLINE is set and the Hugging Face cache")


def test_export_prints_disagreements_as_warning_lines(hub_cache, tmp_path, capsys):
    from engine_fixtures import tiny_vae

    source = tmp_path / "taesd"
    tiny_vae(4, 4).save_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    code, err = run(capsys, "export", "taesd", "--source", source, "--variants", "float32")
    assert code == 0, err
    assert err == (
        f"vaelink: warning: the VAE at {source} says scaling_factor = 0.5, the card 'taesd' says "
        "1.0; the export uses the config's\n"
    )
    assert vaelink.VAE("taesd").card.scaling_factor == 0.5


def test_export_needs_a_card_or_a_source_and_a_name(hub_cache, capsys):
    code, err = run(capsys, "export", "--name", "x")
    assert code == 1 and "give --source and --name" in err
    code, err = run(capsys, "export", "my-vae", "--source", "org/x")
    assert code == 1 and "unknown model 'my-vae'" in err and "--source and --name" in err


def test_version_and_defaults_in_help(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # no line wrapping inside a default
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vaelink {vaelink.__version__}"
    with pytest.raises(SystemExit):
        main(["encode", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: vaelink-tiny)" in text and "(default: 3)" in text  # --model, --retries
    assert "(default: None)" not in text and "(default: False)" not in text


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, photos):
    # A real SIGINT to a real `vaelink encode` busy with 300 images (20-50 s of work).
    import signal
    import time

    image = tmp_path / "big.png"
    image.write_bytes(vaelink.encode_image(photos["astronaut"], "png"))
    command = ["encode", *[str(image)] * 300, "-q", "-o", str(tmp_path / "out.safetensors")]
    process = subprocess.Popen(
        [sys.executable, "-m", "vaelink", *command],
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a shell's background job (`cmd &`) starts with SIGINT ignored, and
        # Python then never installs its KeyboardInterrupt handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(8)  # imports done, encoding under way
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    kept, interrupted = err.strip().splitlines()
    assert interrupted == "vaelink: interrupted"
    # What was finished is kept, written whole, and says it is not all.
    tensors, metadata = vaelink.load_latents(tmp_path / "out.safetensors")
    assert (
        kept
        == f"vaelink: kept the {len(tensors)} of 300 images encoded in {tmp_path / 'out.safetensors'}"
    )
    assert 0 < len(tensors) < 300 and metadata["complete"] == "false"
    assert json.loads(metadata["files"]) == [str(image)] * len(tensors)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "args",
    [
        ["--autoscale", "3"],
        ["--autoscale", "a:b"],
        ["--replicas", "0"],
        ["--replicas", "2", "--autoscale", "1:2"],
    ],
)
def test_serve_on_ray_refuses_bad_scaling_before_starting_anything(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--ray", *args])
    assert exit_.value.code == 2 and "usage:" in capsys.readouterr().err


def test_serve_on_ray_refuses_haproxy_for_a_running_cluster(capsys):
    # The ingress of a cluster is its own (chosen where it starts): refused before connecting.
    assert main(["serve", "--ray", "127.0.0.1:1", "--ingress", "haproxy"]) != 0
    assert "RAY_SERVE_ENABLE_HA_PROXY" in capsys.readouterr().err
