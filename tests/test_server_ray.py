"""`vaelink serve --ray`: the app of `vaelink serve` as Ray Serve replicas on a local cluster started
here (CPU, the bundled model). Against direct `vaelink serve` on the same model: the unmodified
diffusers client and vaelink's client get the same answers; two replicas serve concurrent clients,
each answer matching its request; `/health` and `/metrics` cover every replica; a replica killed
under load loses no request that the client does not retry successfully. The command line runs
it with HAProxy as the ingress, a token and limits."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from diffusers.utils.remote_utils import remote_decode, remote_encode
from PIL import Image
from server_fixtures import LiveServer, free_port, metric_sum, parse_metrics

import vaelink
from vaelink.cards import DEFAULT_MODEL
from vaelink.engine import Engine
from vaelink.server import Batching, Limits, create_app

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from vaelink.server.ray_serve import Replicas, application  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers: do_scaling

LIMITS = Limits(max_body_bytes=1 << 20, max_pixels=512 * 512, max_batch=4)
BATCHING = Batching(max_batch=8, max_wait_ms=10)
REPLICAS = Replicas(count=2, cpus=0.5)  # the cluster has 2 CPUs: room for Serve's own actors


def ray_env(folder: Path) -> dict[str, str]:
    """A cluster's temporary files, sockets and session under `folder`; no auth token file."""
    return {"RAY_TMPDIR": str(folder), "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}


@pytest.fixture(scope="module")
def model() -> Engine:
    return Engine(DEFAULT_MODEL, provider="cpu")


@pytest.fixture(scope="module")
def direct(model: Engine) -> Iterator[LiveServer]:
    """`vaelink serve` on the same model: the reference for every answer."""
    app = create_app({model.card.name: model}, limits=LIMITS, batching=BATCHING)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def fleet() -> Iterator[str]:
    """The Serve application (two replicas) on a local cluster of two CPUs; its URL."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths are short
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        for key, value in ray_env(folder).items():
            env.setenv(key, value)
        env.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(folder), log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            app = application([DEFAULT_MODEL], limits=LIMITS, batching=BATCHING, replicas=REPLICAS)
            serve.run(app, name="vaelink", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            wait_for_replicas(url, 2)
            yield url
        finally:
            ray.shutdown()  # the whole cluster, Serve's actors with it
            shutil.rmtree(folder, ignore_errors=True)


def wait_for_replicas(url: str, count: int, timeout: float = 120) -> dict[str, Any]:
    """`/health` once `count` replicas report ok."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            health = requests.get(url + "/health", timeout=5).json()
            replicas = health.get("replicas", {})
            if len(replicas) == count and health["status"] == "ok":
                return health
        except (requests.RequestException, ValueError):
            health = None
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} replicas never reported: {health}")
        time.sleep(0.5)


def latents(seed: int, channels: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, channels, 8, 8)).astype(np.float32)


def photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    image = np.stack([np.sin(x / (4 + c) + rng.random() * 6) * 100 + 120 for c in range(3)], -1)
    return Image.fromarray(np.clip(image + y[..., None] * 0.5, 0, 255).astype(np.uint8))


# -- same answers as vaelink serve ------------------------------------------------------------------


def test_diffusers_client_gets_what_vaelink_serve_gives(fleet, direct, model):
    z = torch.from_numpy(latents(1, model.card.latent_channels))
    scale = model.card.scaling.factor
    for kwargs in (
        {"output_type": "pt", "partial_postprocess": True},
        {"output_type": "pt", "partial_postprocess": False, "return_type": "pt"},
        {"output_type": "pil", "image_format": "png"},
    ):
        ours, theirs = (
            remote_decode(url, z, scaling_factor=scale, **kwargs) for url in (fleet, direct.url)
        )
        if isinstance(ours, torch.Tensor):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        else:
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    image = photo(2)
    ours, theirs = (remote_encode(url, image, scaling_factor=scale) for url in (fleet, direct.url))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_vaelink_client_gets_what_vaelink_serve_gives(fleet, direct, model):
    z = latents(3, model.card.latent_channels)
    images = [vaelink.decode(z, endpoint=url, output="numpy") for url in (fleet, direct.url)]
    np.testing.assert_array_equal(*images)
    np.testing.assert_array_equal(images[0], model.decode(z))
    pixels = np.asarray(photo(4))
    codes = [vaelink.encode(pixels, endpoint=url) for url in (fleet, direct.url)]
    np.testing.assert_array_equal(*codes)


def test_bad_requests_are_json_4xx_and_the_replicas_go_on(fleet, direct, model):
    for url in (fleet, direct.url):
        junk = requests.post(url + "/decode", data=b"xx", params={"shape": "1,16,8,8"})
        too_big = requests.post(url + "/encode", data=b"\0" * (LIMITS.max_body_bytes + 1))
        for response, status in ((junk, 400), (too_big, 413)):
            assert response.status_code == status, response.text
            assert response.headers["content-type"].startswith("application/json")
            assert response.json()["error"]
    test_vaelink_client_gets_what_vaelink_serve_gives(fleet, direct, model)


# -- a fleet ----------------------------------------------------------------------------------------


def test_two_replicas_serve_concurrent_clients_each_their_own_answer(fleet, model):
    time.sleep(1.5)  # the reports are at most a second old: they include earlier tests' requests
    before = parse_metrics(requests.get(fleet + "/metrics").text)
    channels = model.card.latent_channels
    seeds = range(100, 164)

    def one(seed: int) -> None:
        z = latents(seed, channels)
        got = vaelink.decode(z, endpoint=fleet, output="numpy")
        np.testing.assert_array_equal(got, model.decode(z))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, seeds))
    time.sleep(1.5)  # every replica has reported since
    after = parse_metrics(requests.get(fleet + "/metrics").text)
    served = {
        replica: metric_sum(after, "vaelink_requests_total", replica=replica, status="200")
        - metric_sum(before, "vaelink_requests_total", replica=replica, status="200")
        for replica in wait_for_replicas(fleet, 2)["replicas"]
    }
    assert sum(served.values()) == len(seeds), served
    assert all(count > 0 for count in served.values()), served  # both replicas took a share


def test_health_and_metrics_cover_every_replica(fleet, model):
    health = wait_for_replicas(fleet, 2)
    assert health["models"] == [model.card.name]
    for report in health["replicas"].values():
        assert report["status"] == "ok" and report["models"] == [model.card.name]
        assert report["pid"] > 0 and report["reported_s_ago"] < 5
    assert len({r["pid"] for r in health["replicas"].values()}) == 2
    response = requests.get(fleet + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    metrics = parse_metrics(response.text)
    assert metrics["vaelink_replicas"] == 2
    for replica in health["replicas"]:
        assert f'vaelink_requests_in_flight{{replica="{replica}"}}' in metrics


def test_a_replica_killed_under_load_loses_no_request(fleet, model):
    """Clients retry as vaelink's client does (connection errors, 503); every request of every
    client is answered, and correctly, while one replica is SIGKILLed and replaced."""
    health = wait_for_replicas(fleet, 2)
    victim, report = sorted(health["replicas"].items())[0]
    channels = model.card.latent_channels
    stop = threading.Event()
    answered: list[int] = []
    failures: list[BaseException] = []

    def client(worker: int) -> None:
        seed = worker * 10_000
        while not stop.is_set():
            seed += 1
            z = latents(seed, channels)
            try:
                got = vaelink.decode(z, endpoint=fleet, output="numpy")
                np.testing.assert_array_equal(got, model.decode(z))
                answered.append(seed)
            except BaseException as error:  # every failure is the test's finding
                failures.append(error)
                return

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    os.kill(report["pid"], signal.SIGKILL)
    killed_at = len(answered)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # until Serve has replaced it
        replicas = requests.get(fleet + "/health", timeout=10).json()["replicas"]
        if len(replicas) == 2 and victim not in replicas:
            break
        time.sleep(0.5)
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[:3]
    assert len(answered) > killed_at + 8  # the fleet kept answering after the kill
    assert victim not in wait_for_replicas(fleet, 2)["replicas"]  # replaced


# -- the command line, with HAProxy as the ingress --------------------------------------------------


def test_cli_serves_on_ray_with_haproxy_a_token_and_limits(tmp_path, direct, model):
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(ray_env(folder), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "vaelink", "serve", "--ray", "--ingress", "haproxy"]
    command += ["--replicas", "2", "--cpus-per-replica", "0.5", "--port", str(port)]
    command += ["--token-file", str(token_file), "--max-body-mb", "1", "--graceful-timeout", "5"]
    log = open(tmp_path / "log", "w+")  # noqa: SIM115 - read after the process ends
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_replicas(url, 2, timeout=180)
        deadline = time.monotonic() + 120
        while "vaelink: serving at" not in (tmp_path / "log").read_text():  # serve.run returned
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        z = latents(7, model.card.latent_channels)
        assert requests.post(url, params={"shape": "1,16,8,8"}).status_code == 401
        assert requests.get(url + "/metrics").status_code == 401
        ours = vaelink.decode(z, endpoint=url, token="s3cret", output="numpy")
        np.testing.assert_array_equal(ours, vaelink.decode(z, endpoint=direct.url, output="numpy"))
        big = requests.post(url, data=b"\0" * (2 << 20), headers={"Authorization": "Bearer s3cret"})
        assert big.status_code == 413 and big.json()["error"]
        info = requests.get(url + "/info", headers={"Authorization": "Bearer s3cret"}).json()
        assert info["limits"]["max_body_bytes"] == 1 << 20
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            code = None
        log.seek(0)
        output = log.read()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
    assert code == 0, output[-3000:]
    assert "serving" in output, output[-3000:]
    left = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes of the cluster outlived it: {left}"


def test_replicas_options_follow_the_batching():
    options = Replicas(count=3, gpus=0.5).deployment_options(Batching(max_batch=16, max_queue=48))
    assert options["num_replicas"] == 3
    assert options["max_ongoing_requests"] == 48  # the app's whole queue, so batches fill
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    scaled = Replicas(autoscale=(1, 4)).deployment_options(Batching(max_batch=16))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"]["target_ongoing_requests"] == 16  # a full batch each
    assert (
        scaled["autoscaling_config"]["min_replicas"],
        scaled["autoscaling_config"]["max_replicas"],
    ) == (1, 4)
    for bad in ({"count": 0}, {"autoscale": (3, 2)}, {"gpus": -1}):
        with pytest.raises(ValueError):
            Replicas(**bad)
