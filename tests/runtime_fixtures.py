"""Fakes for the runtime's outside world: installed distributions and NVML (no GPU here)."""

from __future__ import annotations

import importlib.metadata
import types
from typing import Any

import pytest

from vaelink import runtime


def only_installed(monkeypatch: pytest.MonkeyPatch, installed: dict[str, str]) -> None:
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name in runtime.RUNTIME_DISTRIBUTIONS:
            if name not in installed:
                raise importlib.metadata.PackageNotFoundError(name)
            return installed[name]
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def fake_nvml(devices: dict[Any, tuple[str, int, int]]) -> types.ModuleType:
    """A pynvml with `devices` (index or UUID -> name, total, free)."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def handle(key: Any) -> Any:
        if key not in devices:
            raise NVMLError("not found")
        return key

    nvml.NVMLError = NVMLError  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByUUID = handle  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda h: devices[h][0]  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=devices[h][1], free=devices[h][2], used=devices[h][1] - devices[h][2]
    )
    return nvml
