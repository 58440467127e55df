"""`vaelink doctor`: what will actually run here, for users and bug reports.

It reports the installed ONNX Runtime distributions (and a conflict between two), the providers that
load - a CUDA session is opened on the bundled model and asked which providers it got, since ONNX
Runtime lists CUDA whenever onnxruntime-gpu is installed and quietly falls back to the CPU - the CUDA
libraries the process then has, each GPU's name and free memory, OpenVINO and whether the CPU has
native bfloat16 (the CPU engine's default then), the versions of torch and diffusers
(read from their metadata: importing torch would load CUDA libraries and hide what vaelink alone
finds), and every export on this machine, verified against its manifest."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from .cards import DEFAULT_MODEL
from .engine import default_cpu_dtype
from .errors import VaelinkError
from .exports import MANIFEST, cache_dir, find_export, read_manifest, versions
from .openvino_session import bfloat16_native, cpu_capabilities, load_openvino
from .runtime import (
    conflict_message,
    cuda_provider_options,
    cuda_session_providers,
    installed_runtimes,
    lists_cuda,
    load_onnxruntime,
    loaded_cuda_libraries,
    preload_cuda_libraries,
    visible_gpus,
)

__all__ = ["diagnose", "format_report"]

PACKAGES = ("torch", "diffusers", "nvidia-ml-py")  # versions from metadata: importing loads CUDA


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """What native code writes to file descriptor 2 inside the block (ONNX Runtime logs there why
    a provider did not load), as lines, once the block ends."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


def _probe_cuda(ort: Any) -> dict[str, Any]:
    """Opens a small graph on the CUDA provider: does ONNX Runtime keep it?"""
    if not lists_cuda(ort):
        return {"status": "not built", "detail": "this onnxruntime has no CUDA provider"}
    preload_cuda_libraries(ort)
    with _captured_stderr() as log:
        try:
            providers = cuda_session_providers(ort, cuda_provider_options(0, "heuristic", None))
        except Exception as e:  # onnxruntime raises its own exception types
            providers, log = [], [str(e)]
    if "CUDAExecutionProvider" in providers:
        return {"status": "loads", "detail": None}
    reason = [line.strip() for line in log if line.strip()][-3:]
    return {"status": "does not load", "detail": " | ".join(reason) or "no reason logged"}


def _runtime() -> dict[str, Any]:
    try:
        ort = load_onnxruntime()
    except VaelinkError as e:
        return {"error": str(e), "providers": {}}
    providers = {"CPUExecutionProvider": {"status": "loads", "detail": None}}
    providers["CUDAExecutionProvider"] = _probe_cuda(ort)
    return {
        "version": ort.__version__,
        "module": os.path.dirname(ort.__file__),
        "listed_providers": list(ort.get_available_providers()),
        "providers": providers,
    }


def _openvino() -> dict[str, Any]:
    try:
        openvino = load_openvino()
    except VaelinkError as e:
        return {"error": str(e)}
    capabilities = sorted(cpu_capabilities())
    return {
        "version": openvino.get_version(),
        "cpu_capabilities": capabilities,
        "bfloat16_native": bfloat16_native(frozenset(capabilities)),
    }


def _gpus() -> list[dict[str, Any]]:
    return [
        {"index": index, "name": gpu.name, "total": gpu.total, "free": gpu.free}
        for index, gpu in enumerate(visible_gpus())
    ]


def _exports() -> list[dict[str, Any]]:
    folders = [find_export(DEFAULT_MODEL)]
    root = cache_dir() / "exports"
    if root.is_dir():
        folders += sorted(f for f in root.iterdir() if (f / MANIFEST).is_file())
    found = []
    for folder in folders:
        entry: dict[str, Any] = {"name": folder.name, "folder": str(folder)}
        try:
            manifest = read_manifest(folder, verify=True)
        except VaelinkError as e:
            entry.update(verified=False, error=str(e))
        else:
            entry.update(verified=True, variants=list(manifest.variants))
            entry["exported_with"] = manifest.exporter
        found.append(entry)
    return found


def diagnose() -> dict[str, Any]:
    """Everything `vaelink doctor` prints, as plain data (`--json`)."""
    from . import __version__

    runtimes = installed_runtimes()
    report: dict[str, Any] = {
        "vaelink": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "runtime_distributions": runtimes,
        "onnxruntime": _runtime(),
        "openvino": _openvino(),
    }
    report["cuda_libraries"] = loaded_cuda_libraries()
    report["gpus"] = _gpus()
    found = versions(*PACKAGES)
    report["packages"] = {p: found.get(p) for p in PACKAGES}
    report["exports"] = _exports()
    report["engine"] = _engine_choice(report)
    report["problems"] = _problems(report, runtimes)
    return report


def _engine_choice(report: dict[str, Any]) -> str:
    """What `Engine(provider="auto")` picks here."""
    runtime = report["onnxruntime"]
    if "error" in runtime:
        return "none: no ONNX Runtime (pip install 'vaelink[cpu]' or 'vaelink[gpu]')"
    if runtime["providers"]["CUDAExecutionProvider"]["status"] == "loads":
        gpu = report["gpus"][0]["name"] if report["gpus"] else "GPU 0"
        return f"cuda on {gpu}, float16"
    try:
        dtype = default_cpu_dtype()
    except VaelinkError as e:  # a bad VAELINK_CPU_DTYPE
        return f"none: {e}"
    return "cpu, bfloat16 (OpenVINO)" if dtype == "bfloat16" else "cpu, float32"


def _problems(report: dict[str, Any], runtimes: dict[str, str]) -> list[str]:
    problems = []
    if conflict := conflict_message(runtimes):
        problems.append(conflict)
    cuda = report["onnxruntime"].get("providers", {}).get("CUDAExecutionProvider", {})
    if cuda.get("status") == "does not load":
        problems.append(f"the CUDA provider is installed but does not load: {cuda['detail']}")
    problems += [
        f"export {e['name']} is broken: {e['error']}"
        for e in report["exports"]
        if not e["verified"]
    ]
    return problems


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines `vaelink doctor` prints."""
    lines = [
        f"vaelink {report['vaelink']}, Python {report['python']}, {report['platform']}",
        "runtime distributions: "
        + (", ".join(f"{n} {v}" for n, v in report["runtime_distributions"].items()) or "none"),
    ]
    runtime = report["onnxruntime"]
    if "error" in runtime:
        lines.append(f"onnxruntime: {runtime['error']}")
    else:
        lines.append(f"onnxruntime {runtime['version']} from {runtime['module']}")
        lines.append(f"  listed providers: {', '.join(runtime['listed_providers'])}")
        for name, probe in runtime["providers"].items():
            detail = f" ({probe['detail']})" if probe["detail"] else ""
            lines.append(f"  {name}: {probe['status']}{detail}")
    openvino = report["openvino"]
    if "error" in openvino:
        lines.append("openvino: not installed (vaelink[openvino]: bfloat16 on CPUs that have it)")
    else:
        native = "native" if openvino["bfloat16_native"] else "not native on this CPU"
        lines.append(f"openvino {openvino['version']}: bfloat16 {native}")
    libraries = report["cuda_libraries"]
    lines.append("CUDA libraries loaded: " + (", ".join(libraries) or "none"))
    lines += [f"  {name}: {path}" for name, path in libraries.items()]
    gpus = report["gpus"]
    if gpus:
        lines.append("GPUs:")
    elif report["packages"]["nvidia-ml-py"] is None:
        lines.append("GPUs: unknown (nvidia-ml-py, which vaelink[gpu] brings, is not installed)")
    else:
        lines.append("GPUs: none seen by NVML")
    lines += [
        f"  {g['index']}: {g['name']}, {_gib(g['free'])} free of {_gib(g['total'])}" for g in gpus
    ]
    lines.append(
        "packages: "
        + ", ".join(f"{p} {v or 'not installed'}" for p, v in report["packages"].items())
    )
    lines.append("exports:")
    for e in report["exports"]:
        state = ",".join(e["variants"]) if e["verified"] else f"BROKEN: {e['error']}"
        lines.append(f"  {e['name']}: {state} ({e['folder']})")
    lines.append(f"engine (provider=auto): {report['engine']}")
    lines += [f"problem: {p}" for p in report["problems"]] or ["no problems found"]
    return "\n".join(lines)


def print_report(as_json: bool) -> int:
    """`vaelink doctor`: 1 when a problem was found."""
    import json

    report = diagnose()
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 1 if report["problems"] else 0
