"""ONNX Runtime as the process has it (`vaelink.runtime`): distributions and their conflicts, the CUDA
libraries, GPU memory through NVML (faked: no GPU here), the activation budget, CUDA provider options
and where tensors are bound."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from runtime_fixtures import fake_nvml, only_installed

from vaelink import runtime
from vaelink.errors import RuntimeMissingError, VaelinkWarning
from vaelink.exports import versions
from vaelink.runtime import GpuMemory

GiB = 1 << 30


def test_installed_runtimes_name_the_distribution_that_provides_the_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    only_installed(monkeypatch, {"onnxruntime-gpu": "1.31.1"})
    assert runtime.installed_runtimes() == {"onnxruntime-gpu": "1.31.1"}
    # What an export's manifest records: the GPU distribution, not a missing "onnxruntime".
    recorded = versions("onnx", *runtime.RUNTIME_DISTRIBUTIONS)
    assert recorded["onnxruntime-gpu"] == "1.31.1" and "onnxruntime" not in recorded


def test_one_runtime_is_no_conflict_two_are() -> None:
    assert runtime.conflict_message({"onnxruntime": "1.31.1"}) is None
    message = runtime.conflict_message({"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1"})
    assert message is not None
    assert "onnxruntime 1.31.1, onnxruntime-gpu 1.31.1" in message
    assert "pip install onnxruntime-gpu" in message and "\n" not in message


def test_loading_warns_once_about_two_runtimes(monkeypatch: pytest.MonkeyPatch) -> None:
    only_installed(monkeypatch, {"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1"})
    runtime._warn_conflicts.cache_clear()
    try:
        with pytest.warns(runtime.RuntimeConflictWarning, match="overwrite each other"):
            runtime.load_onnxruntime()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            runtime.load_onnxruntime()  # once per process
    finally:
        runtime._warn_conflicts.cache_clear()
    assert issubclass(runtime.RuntimeConflictWarning, VaelinkWarning)


def test_missing_runtime_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeMissingError, match=r"vaelink\[cpu\].*vaelink\[gpu\]"):
        runtime.load_onnxruntime()


class FakeOrt:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls = 0
        self.fail = fail

    def preload_dlls(self) -> None:
        self.calls += 1
        if self.fail:
            raise self.fail


def test_cuda_libraries_are_preloaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_preloaded", False)
    ort = FakeOrt()
    runtime.preload_cuda_libraries(ort)
    runtime.preload_cuda_libraries(ort)
    assert ort.calls == 1


def test_a_failed_preload_warns_and_leaves_the_decision_to_the_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime, "_preloaded", False)
    with pytest.warns(VaelinkWarning, match="could not preload the CUDA libraries"):
        runtime.preload_cuda_libraries(FakeOrt(RuntimeError("no such directory")))
    monkeypatch.setattr(runtime, "_preloaded", False)
    runtime.preload_cuda_libraries(object())  # an ONNX Runtime older than preload_dlls: nothing


def test_loaded_cuda_libraries_come_from_the_process_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    site = "/venv/site-packages/nvidia"
    maps.write_text(
        "\n".join(
            [
                f"7f00-7f01 r-xp 00000000 08:01 1 {site}/cu13/lib/libcudart.so.13",
                f"7f01-7f02 r-xp 00000000 08:01 2 {site}/cu13/lib/libcublasLt.so.13",
                f"7f02-7f03 r-xp 00000000 08:01 3 {site}/cu13/lib/libcublas.so.13",
                f"7f03-7f04 r-xp 00000000 08:01 4 {site}/cudnn/lib/libcudnn.so.9",
                f"7f04-7f05 r-xp 00000000 08:01 4 {site}/cudnn/lib/libcudnn_ops.so.9",
                "7f05-7f06 r-xp 00000000 08:01 5 /usr/lib/libc.so.6",
                "7f06-7f07 rw-p 00000000 00:00 0",
            ]
        )
    )
    found = runtime.loaded_cuda_libraries(maps)
    assert found == {
        "cudart": f"{site}/cu13/lib/libcudart.so.13",
        "cublasLt": f"{site}/cu13/lib/libcublasLt.so.13",
        "cublas": f"{site}/cu13/lib/libcublas.so.13",
        "cudnn": f"{site}/cudnn/lib/libcudnn.so.9",
    }
    assert runtime.loaded_cuda_libraries(tmp_path / "absent") == {}


def test_cuda_provider_options() -> None:
    options = runtime.cuda_provider_options(1, "heuristic", None)
    assert options == {
        "device_id": "1",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    assert runtime.cuda_provider_options(0, "exhaustive", 5 * GiB)["gpu_mem_limit"] == str(5 * GiB)
    with pytest.raises(ValueError, match="cuDNN search"):
        runtime.cuda_provider_options(0, "fastest", None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("visible", "device_id", "expected"),
    [
        (None, 1, 1),
        ("3,1", 0, 3),
        ("3,1", 1, 1),
        ("3,1", 2, None),
        ("", 0, None),
        ("2,-1,0", 1, None),  # CUDA stops at the first invalid entry
        ("GPU-8a1f,1", 0, "GPU-8a1f"),
        ("MIG-4c2e", 0, "MIG-4c2e"),
    ],
)
def test_visible_devices_map_cuda_numbers_to_nvml(
    visible: str | None, device_id: int, expected: int | str | None
) -> None:
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert runtime.visible_device(device_id, env) == expected


def test_gpu_memory_reads_nvml_through_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml(
        {0: ("NVIDIA H200", 141 * GiB, 140 * GiB), 2: ("NVIDIA L4", 24 * GiB, 20 * GiB)}
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert runtime.gpu_memory(0) == GpuMemory("NVIDIA H200", 141 * GiB, 140 * GiB)
    assert [g.name for g in runtime.visible_gpus()] == ["NVIDIA H200"]  # NVML has no device 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert runtime.gpu_memory(0) == GpuMemory("NVIDIA L4", 24 * GiB, 20 * GiB)
    assert runtime.gpu_memory(1) == GpuMemory("NVIDIA H200", 141 * GiB, 140 * GiB)
    assert [g.name for g in runtime.visible_gpus()] == ["NVIDIA L4", "NVIDIA H200"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert runtime.gpu_memory(0) is None  # NVML has no device 1: unknown, not an exception


def test_gpu_memory_without_nvml_or_a_cuda_context_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    # torch is imported in this process but holds no CUDA context: vaelink does not create one.
    import torch

    assert not torch.cuda.is_initialized()
    assert runtime.gpu_memory(0) is None


def test_activation_budget_is_the_free_memory_less_weights_and_headroom() -> None:
    h200 = GpuMemory("NVIDIA H200", 141 * GiB, 140 * GiB)
    # A tenth of the card is kept free (14.1 GiB), and the weights.
    assert runtime.activation_budget(h200, 1 * GiB) == 140 * GiB - GiB - int(14.1 * GiB)
    small = GpuMemory("a small card", 4 * GiB, 3 * GiB)
    assert runtime.activation_budget(small, 0) == 2 * GiB  # at least 1 GiB of headroom
    busy = GpuMemory("a busy card", 24 * GiB, 1 * GiB)
    assert runtime.activation_budget(busy, GiB) == runtime.MIN_BUDGET
    assert runtime.activation_budget(None, GiB) == runtime.FALLBACK_BUDGET


@pytest.mark.parametrize(
    ("device", "index", "provider", "expected"),
    [
        ("cuda", 1, "cuda", ("cuda", 1)),  # stays on its own GPU
        ("cuda", None, "cuda", ("cuda", None)),
        ("cuda", 0, "cpu", ("cpu", None)),  # a CPU session reads host memory only
        ("mps", 0, "cuda", ("cpu", None)),
        ("xpu", 0, "cpu", ("cpu", None)),
        ("cpu", None, "cuda", ("cpu", None)),
        ("cpu", None, "cpu", ("cpu", None)),
    ],
)
def test_binding_device(
    device: str, index: int | None, provider: str, expected: tuple[str, int | None]
) -> None:
    assert runtime.binding_device(device, index, provider) == expected


def test_a_shared_cuda_arena_is_registered_once_per_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import onnxruntime as ort

    registered: list[tuple[str, dict[str, str], int]] = []

    class Ort:
        OrtMemoryInfo = ort.OrtMemoryInfo
        OrtAllocatorType = ort.OrtAllocatorType
        OrtMemType = ort.OrtMemType
        OrtArenaCfg = ort.OrtArenaCfg

        @staticmethod
        def create_and_register_allocator_v2(
            provider: str, memory: Any, options: dict[str, str], arena: Any
        ) -> None:
            if options["device_id"] == "7":
                raise RuntimeError("refused")
            registered.append((provider, options, arena.max_mem))

    monkeypatch.setattr(runtime, "_shared_arenas", {})
    options = runtime.cuda_provider_options(0, "heuristic", None)
    assert runtime.share_cuda_arena(Ort, 0, 3 * GiB, options)
    assert runtime.share_cuda_arena(Ort, 0, 5 * GiB, options)  # the first cap stands
    assert registered == [("CUDAExecutionProvider", options, 3 * GiB)]
    refused = runtime.cuda_provider_options(7, "heuristic", None)
    assert not runtime.share_cuda_arena(Ort, 7, GiB, refused)
