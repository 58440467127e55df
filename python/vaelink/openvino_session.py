"""bfloat16 on the CPU through OpenVINO (`pip install 'vaelink[openvino]'`).

ONNX Runtime's CPU provider computes these graphs in float32 only. OpenVINO compiles the same
float32 ONNX graphs with an inference precision of bfloat16 on CPUs that have it natively
(AVX512-BF16 or AMX: Xeon from Cooper Lake and Sapphire Rapids on, AMD from Zen 4 on); OpenVINO
decides per operation what runs in bfloat16 (convolutions and matrix products above all). The
engine runs its `bfloat16` dtype this way, and picks it by default on such CPUs when OpenVINO is
installed; tests/test_openvino_session.py holds every model family to 40 dB of float32.

`OpenVinoSession` looks like the slice of `onnxruntime.InferenceSession` the engine calls (`run`,
`get_inputs`, `get_outputs`), so the engine's code paths stay one. Nothing here imports OpenVINO
before it is used."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EngineError, RuntimeMissingError

__all__ = ["OpenVinoSession", "bfloat16_native", "load_openvino"]

# OpenVINO's names for the engine's dtypes (`INFERENCE_PRECISION_HINT`).
_HINTS = {"bfloat16": "bf16", "float32": "f32"}


def load_openvino() -> Any:
    """openvino, imported on first use; `RuntimeMissingError` naming the extra without it."""
    try:
        import openvino
    except ImportError:
        raise RuntimeMissingError(
            "reduced precision on the CPU needs OpenVINO, which is not installed: "
            "pip install 'vaelink[openvino]'",
            name="openvino",
        ) from None
    return openvino


@functools.cache
def _core() -> Any:
    return load_openvino().Core()


def cpu_capabilities() -> frozenset[str]:
    """What OpenVINO says the CPU computes natively (`BF16`, `FP16`, ...); empty without it."""
    try:
        return frozenset(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except RuntimeMissingError:
        return frozenset()


def bfloat16_native(capabilities: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (OpenVINO's `BF16` capability; `capabilities`
    defaults to this machine's). x86 CPUs with AVX512-FP16 list `FP16` too, but float16's range
    overflows in a VAE's large activations where bfloat16's (float32's) does not."""
    return "BF16" in (cpu_capabilities() if capabilities is None else capabilities)


class _Port:
    def __init__(self, name: str) -> None:
        self.name = name


class OpenVinoSession:
    """A float32 ONNX graph compiled by OpenVINO for the CPU at `precision`; inputs and outputs
    stay float32 numpy arrays (OpenVINO converts at the edges)."""

    def __init__(self, path: Path, precision: str) -> None:
        if precision not in _HINTS:
            raise EngineError(f"unknown CPU precision {precision!r}")
        config = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        try:
            self._model = _core().compile_model(str(path), "CPU", config)
        except RuntimeError as e:  # OpenVINO raises RuntimeError for what it cannot read or run
            raise EngineError(f"OpenVINO cannot compile {path}: {e}") from e
        self.precision = precision
        self._inputs = [_Port(p.any_name) for p in self._model.inputs]
        self._outputs = [_Port(p.any_name) for p in self._model.outputs]

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._outputs

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output, in order (`output_names` must be `None`, as the engine passes it)."""
        if output_names is not None:
            raise EngineError("OpenVinoSession.run returns every output")
        request = self._model.create_infer_request()  # one per call: safe across threads
        results = request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        return [np.array(results[port]) for port in self._model.outputs]
