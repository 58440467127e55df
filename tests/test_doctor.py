"""`vaelink doctor`: the report on this machine (CPU runtime, bundled model), a broken export, and
the CUDA cases with a fake ONNX Runtime and a fake NVML (no GPU here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from runtime_fixtures import fake_nvml, only_installed

from vaelink import doctor, openvino_session, runtime
from vaelink.cards import DEFAULT_MODEL
from vaelink.exports import find_export

GiB = 1 << 30


def run_doctor(*args: str, home: Path) -> tuple[int, str]:
    env = {**os.environ, "VAELINK_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-m", "vaelink", "doctor", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return done.returncode, done.stdout


def test_doctor_on_this_machine(tmp_path: Path) -> None:
    code, out = run_doctor("--json", home=tmp_path)
    report = json.loads(out)
    assert code == 0 and report["problems"] == []
    assert "onnxruntime" in report["runtime_distributions"]
    providers = report["onnxruntime"]["providers"]
    assert providers["CPUExecutionProvider"]["status"] == "loads"
    assert providers["CUDAExecutionProvider"]["status"] == "not built"  # the CPU build here
    (bundled,) = report["exports"]
    assert bundled["name"] == DEFAULT_MODEL and bundled["verified"] is True
    assert report["engine"] == "cpu, float32"
    code, text = run_doctor(home=tmp_path)
    assert code == 0 and "engine (provider=auto): cpu, float32" in text
    assert "no problems found" in text


def test_a_broken_export_is_a_problem(tmp_path: Path) -> None:
    export = tmp_path / "exports" / "mine"
    shutil.copytree(find_export(DEFAULT_MODEL), export)
    with open(export / "decoder-float32.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    code, out = run_doctor("--json", home=tmp_path)
    report = json.loads(out)
    assert code == 1
    (broken,) = [e for e in report["exports"] if e["name"] == "mine"]
    assert broken["verified"] is False and "decoder-float32.onnx" in broken["error"]
    assert any("export mine is broken" in p for p in report["problems"])


class FakeSession:
    def __init__(self, providers: list[str]) -> None:
        self.providers = providers

    def get_providers(self) -> list[str]:
        return self.providers


def fake_ort(cuda_loads: bool) -> Any:
    import onnxruntime

    ort = types.SimpleNamespace(
        __version__="1.31.1",
        __file__=onnxruntime.__file__,
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        preload_dlls=lambda: None,
    )

    def session(path: str, providers: list[Any]) -> FakeSession:
        assert providers[0][0] == "CUDAExecutionProvider"
        if cuda_loads:
            return FakeSession(["CUDAExecutionProvider", "CPUExecutionProvider"])
        # What ONNX Runtime's C++ logger writes when the provider library cannot load its deps.
        os.write(
            2, b"Failed to load libonnxruntime_providers_cuda.so: libcudnn.so.9: no such file\n"
        )
        return FakeSession(["CPUExecutionProvider"])

    ort.InferenceSession = session
    return ort


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))
    monkeypatch.setattr(runtime, "_preloaded", False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    only_installed(monkeypatch, {"onnxruntime-gpu": "1.31.1"})
    return monkeypatch


def test_cuda_listed_but_not_loading_is_a_problem_with_its_reason(
    machine: pytest.MonkeyPatch,
) -> None:
    machine.setattr(doctor, "load_onnxruntime", lambda: fake_ort(cuda_loads=False))
    machine.setitem(sys.modules, "pynvml", None)
    report = doctor.diagnose()
    cuda = report["onnxruntime"]["providers"]["CUDAExecutionProvider"]
    assert cuda["status"] == "does not load"
    assert "libcudnn.so.9: no such file" in cuda["detail"]
    assert report["engine"] == "cpu, float32"
    assert any("installed but does not load" in p for p in report["problems"])
    text = doctor.format_report(report)
    assert "GPUs: unknown (nvidia-ml-py" in text or "nvidia-ml-py 1" in text


def test_cuda_that_loads_names_the_gpu(machine: pytest.MonkeyPatch) -> None:
    machine.setattr(doctor, "load_onnxruntime", lambda: fake_ort(cuda_loads=True))
    nvml = fake_nvml(
        {0: ("NVIDIA H200", 141 * GiB, 140 * GiB), 1: ("NVIDIA H200", 141 * GiB, 2 * GiB)}
    )
    machine.setitem(sys.modules, "pynvml", nvml)
    report = doctor.diagnose()
    assert report["onnxruntime"]["providers"]["CUDAExecutionProvider"]["status"] == "loads"
    assert [g["free"] for g in report["gpus"]] == [140 * GiB, 2 * GiB]
    assert report["engine"] == "cuda on NVIDIA H200, float16"
    assert report["problems"] == []
    assert report["runtime_distributions"] == {"onnxruntime-gpu": "1.31.1"}
    text = doctor.format_report(report)
    assert "  0: NVIDIA H200, 140.0 GiB free of 141.0 GiB" in text
    assert "CUDAExecutionProvider: loads" in text


def test_two_runtimes_are_a_problem(machine: pytest.MonkeyPatch) -> None:
    only_installed(machine, {"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1"})
    machine.setattr(doctor, "load_onnxruntime", lambda: fake_ort(cuda_loads=True))
    machine.setitem(sys.modules, "pynvml", None)
    report = doctor.diagnose()
    assert any("overwrite each other" in p for p in report["problems"])


@pytest.mark.parametrize("native", [True, False])
def test_openvino_and_the_cpus_bfloat16_decide_the_cpu_engine(
    native: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))
    monkeypatch.delenv("VAELINK_CPU_DTYPE")  # conftest's float32, so the machine decides
    caps = frozenset({"FP32", "INT8", *(["BF16"] if native else [])})
    monkeypatch.setattr(openvino_session, "cpu_capabilities", lambda: caps)
    monkeypatch.setattr(doctor, "cpu_capabilities", lambda: caps)
    report = doctor.diagnose()
    assert report["openvino"]["bfloat16_native"] is native
    assert report["engine"] == ("cpu, bfloat16 (OpenVINO)" if native else "cpu, float32")
    text = doctor.format_report(report)
    assert ("bfloat16 native" if native else "bfloat16 not native on this CPU") in text
    monkeypatch.setenv("VAELINK_CPU_DTYPE", "float32")
    assert doctor.diagnose()["engine"] == "cpu, float32"


def test_without_openvino_doctor_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "openvino", None)
    report = doctor.diagnose()
    assert "vaelink[openvino]" in report["openvino"]["error"]
    assert "openvino: not installed" in doctor.format_report(report)
