"""ONNX Runtime as this process really has it: which distributions are installed, the CUDA libraries,
the GPUs and their free memory, and the options CUDA sessions are opened with.

Nothing here imports onnxruntime, torch or NVML at import time. The engine (`vaelink.engine`) and
`vaelink doctor` (`vaelink.doctor`) are the users; functions that touch a GPU take their library
calls from modules that can be faked in tests."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import RuntimeMissingError, VaelinkWarning
from .frameworks import torch_if_imported

__all__ = [
    "CudnnSearch",
    "GpuMemory",
    "activation_budget",
    "binding_device",
    "cuda_provider_options",
    "cuda_session_providers",
    "cuda_unavailable",
    "gpu_memory",
    "installed_runtimes",
    "load_onnxruntime",
    "loaded_cuda_libraries",
    "preload_cuda_libraries",
    "share_cuda_arena",
    "visible_gpus",
]

CudnnSearch = Literal["exhaustive", "heuristic", "default"]
CUDNN_SEARCH: dict[str, str] = {
    "exhaustive": "EXHAUSTIVE",  # ONNX Runtime's default: the fastest kernels, seconds per new shape
    "heuristic": "HEURISTIC",  # cuDNN's guess: no search, for services whose shapes vary
    "default": "DEFAULT",  # the first algorithm cuDNN lists
}

# Distributions that each install the `onnxruntime` module: two of them overwrite each other's files.
RUNTIME_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "onnxruntime-directml",
    "onnxruntime-qnn",
    "onnxruntime-rocm",
    "onnxruntime-training",
)

CUDA_LIBRARIES = ("cudart", "cublas", "cublasLt", "cudnn", "cufft", "curand", "nvrtc")

# Kept free on the card beyond vaelink's plan: the CUDA context, cuDNN and cuBLAS workspaces, and
# whatever else runs there. The larger of 1 GiB and a tenth of the card.
HEADROOM_FLOOR = 1 << 30
HEADROOM_FRACTION = 0.10
MIN_BUDGET = 256 << 20
FALLBACK_BUDGET = 8 << 30  # when no GPU memory can be read (no NVML, no torch context)


class RuntimeConflictWarning(VaelinkWarning):
    """Two ONNX Runtime distributions are installed; the `onnxruntime` module is a mix of both."""


def installed_runtimes() -> dict[str, str]:
    """Each installed distribution that provides the `onnxruntime` module, with its version."""
    found: dict[str, str] = {}
    for name in RUNTIME_DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def conflict_message(runtimes: dict[str, str]) -> str | None:
    """One sentence when more than one runtime distribution is installed, else None."""
    if len(runtimes) < 2:
        return None
    listed = ", ".join(f"{name} {version}" for name, version in runtimes.items())
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in runtimes else next(iter(runtimes))
    return (
        f"{listed} are all installed and overwrite each other's files in the onnxruntime "
        f"module; uninstall all of them, then install one (pip install {keep})"
    )


@functools.cache
def _warn_conflicts() -> None:
    if message := conflict_message(installed_runtimes()):
        warnings.warn(message, RuntimeConflictWarning, stacklevel=4)


def load_onnxruntime() -> Any:
    """onnxruntime, imported on first use; `RuntimeMissingError` naming the extras without it, and
    one `RuntimeConflictWarning` per process when two runtime distributions are installed."""
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeMissingError(
            "the local engine needs ONNX Runtime, which is not installed: "
            "pip install 'vaelink[cpu]', or 'vaelink[gpu]' for CUDA (one of the two, never both)"
        ) from None
    _warn_conflicts()
    return onnxruntime


def cuda_unavailable(providers: list[str], file: str | None = None) -> str:
    """Why CUDA is not there, in one sentence, from what a CUDA session (for `file`) got instead
    (`providers` empty: this ONNX Runtime has no CUDA provider at all)."""
    if not providers:
        return "this onnxruntime has no CUDA provider: pip install 'vaelink[gpu]'"
    where = f" for {file}" if file else ""
    return (
        f"ONNX Runtime's CUDA provider did not load{where} (its session got "
        f"{', '.join(providers)}): "
        "onnxruntime-gpu needs the CUDA and cuDNN libraries (pip install 'vaelink[gpu]') and a "
        "visible GPU"
    )


def lists_cuda(ort: Any) -> bool:
    """ONNX Runtime was built with the CUDA provider. Not that it loads: see `preload_cuda_libraries`
    and check each session's `get_providers()`."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


_preloaded = False


def preload_cuda_libraries(ort: Any) -> None:
    """Loads the CUDA and cuDNN libraries the CUDA provider needs, once per process.

    The provider finds libcudart, libcublas and libcudnn only if something loaded them first (torch
    does on import) or they are on the loader's path; otherwise ONNX Runtime quietly builds a CPU
    session. `onnxruntime.preload_dlls` loads them from the nvidia-* wheels (ONNX Runtime >= 1.21)."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    try:
        ort.preload_dlls()
    except (OSError, RuntimeError) as e:  # a missing folder; the session check still decides
        warnings.warn(f"could not preload the CUDA libraries: {e}", VaelinkWarning, stacklevel=3)


# A graph every ONNX Runtime can run, to ask a session which providers it really got: the bundled
# model's float32 decoder (1 MB, always in the package).
PROBE_MODEL = Path(__file__).parent / "models" / "vaelink-tiny" / "decoder-float32.onnx"


def cuda_session_providers(ort: Any, options: dict[str, str]) -> list[str]:
    """The providers a session asked for CUDA (with `options`) really has, on a small graph: ONNX
    Runtime lists CUDA whenever onnxruntime-gpu is installed, and builds a CPU session when the
    provider cannot load. Empty when this ONNX Runtime has no CUDA provider at all."""
    if not lists_cuda(ort):
        return []
    session = ort.InferenceSession(
        str(PROBE_MODEL), providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    )
    return list(session.get_providers())


def loaded_cuda_libraries(maps: Path = Path("/proc/self/maps")) -> dict[str, str]:
    """The CUDA libraries mapped into this process (Linux), by short name: where they came from."""
    found: dict[str, str] = {}
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        path = line.split()[-1] if line.strip() else ""
        name = os.path.basename(path)
        for lib in CUDA_LIBRARIES:
            # libcublasLt.so.13 is not libcublas: compare the stem up to ".so".
            if name.startswith(f"lib{lib}") and name[len(lib) + 3 :].startswith((".so", "_")):
                found.setdefault(lib, path)
    return found


def cuda_provider_options(
    device_id: int, search: CudnnSearch, memory_limit: int | None
) -> dict[str, str]:
    """The CUDA provider's options for a session on `device_id`. `memory_limit` caps that session's
    own arena: pass it only when no shared arena is registered (`share_cuda_arena`)."""
    if search not in CUDNN_SEARCH:
        raise ValueError(f"unknown cuDNN search {search!r}; expected one of {sorted(CUDNN_SEARCH)}")
    options = {
        "device_id": str(device_id),
        # Grow by what is asked, not in powers of two: the default doubled past 16 GiB at 2048^2.
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": CUDNN_SEARCH[search],
    }
    if memory_limit:
        options["gpu_mem_limit"] = str(memory_limit)
    return options


_shared_arenas: dict[int, int | None] = {}


def share_cuda_arena(ort: Any, device_id: int, limit: int, options: dict[str, str]) -> bool:
    """Registers one CUDA arena for `device_id`, capped at `limit` bytes, that every session opened
    with `session.use_env_allocators` uses: the cap then holds for the process, not per session
    (an engine opens up to four whole-graph sessions and, for exact tiling, dozens of segments).
    The first engine on a device sets its cap. False when ONNX Runtime refuses (sessions then keep
    an arena each, capped one by one)."""
    if device_id not in _shared_arenas:
        memory = ort.OrtMemoryInfo(
            "Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, device_id, ort.OrtMemType.DEFAULT
        )
        arena = ort.OrtArenaCfg({"max_mem": limit, "arena_extend_strategy": 1})
        try:
            ort.create_and_register_allocator_v2("CUDAExecutionProvider", memory, options, arena)
        except Exception:  # onnxruntime raises its own exception types
            _shared_arenas[device_id] = None
        else:
            _shared_arenas[device_id] = limit
    return _shared_arenas[device_id] is not None


@dataclass(frozen=True)
class GpuMemory:
    """One GPU as the driver reports it now."""

    name: str
    total: int
    free: int


def visible_device(device_id: int, env: Mapping[str, str] | None = None) -> int | str | None:
    """The NVML index (or UUID) of CUDA device `device_id`, through CUDA_VISIBLE_DEVICES: CUDA
    numbers only the visible devices, NVML numbers all of them. None when it is not visible."""
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return device_id
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    seen: list[int | str] = []
    for entry in entries:  # CUDA stops at the first invalid entry
        if entry.lstrip("-").isdigit():
            if int(entry) < 0:
                break
            seen.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")):
            seen.append(entry)
        else:
            break
    return seen[device_id] if device_id < len(seen) else None


def _nvml_memory(device_id: int) -> GpuMemory | None:
    try:
        import pynvml  # nvidia-ml-py, in the gpu extra
    except ImportError:
        return None
    target = visible_device(device_id)
    if target is None:
        return None
    try:
        pynvml.nvmlInit()
        if isinstance(target, str):
            handle = pynvml.nvmlDeviceGetHandleByUUID(target)
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(target)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
    except pynvml.NVMLError:
        return None
    name = name.decode() if isinstance(name, bytes) else str(name)
    return GpuMemory(name=name, total=int(info.total), free=int(info.free))


def _torch_memory(device_id: int) -> GpuMemory | None:
    torch: Any = torch_if_imported()
    # Only a torch that already holds a CUDA context: creating one would take memory of its own.
    if torch is None or not torch.cuda.is_initialized():
        return None
    try:
        free, total = torch.cuda.mem_get_info(device_id)
        name = torch.cuda.get_device_name(device_id)
    except (RuntimeError, AssertionError, ValueError):
        return None
    return GpuMemory(name=str(name), total=int(total), free=int(free))


def gpu_memory(device_id: int) -> GpuMemory | None:
    """CUDA device `device_id`'s name, total and free memory (NVML, else an initialised torch), or
    None when neither can tell."""
    return _nvml_memory(device_id) or _torch_memory(device_id)


def visible_gpus(limit: int = 64) -> list[GpuMemory]:
    """Every GPU this process can use, as `gpu_memory` reads them (CUDA's numbering)."""
    found = []
    for device_id in range(limit):
        gpu = gpu_memory(device_id)
        if gpu is None:
            break
        found.append(gpu)
    return found


def activation_budget(gpu: GpuMemory | None, weights: int) -> int:
    """Bytes of activations to plan for on a GPU: its free memory less the weights the sessions
    will load and a headroom (the larger of 1 GiB and a tenth of the card). 8 GiB when the free
    memory is unknown."""
    if gpu is None:
        return FALLBACK_BUDGET
    headroom = max(HEADROOM_FLOOR, int(gpu.total * HEADROOM_FRACTION))
    return max(MIN_BUDGET, gpu.free - weights - headroom)


def binding_device(device_type: str, index: int | None, provider: str) -> tuple[str, int | None]:
    """Where a tensor on `device_type:index` must be for a session on `provider`: CUDA tensors stay
    on their own GPU for a CUDA session (index None: that session's device); everything else - CPU,
    and CUDA, MPS or XPU tensors given to a CPU session - goes through host memory."""
    if device_type == "cuda" and provider == "cuda":
        return "cuda", index
    return "cpu", None
