"""The package as installed: what `import vaelink` loads, the license it ships with, how the local
engine's runtime is chosen (the `cpu` / `gpu` extras) and what a missing one says."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("ml_dtypes", "onnxruntime", "torch", "PIL")


def run_python(code: str) -> dict:
    """`code` in a fresh interpreter (nothing imported yet); the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def test_import_loads_no_heavy_module_until_used() -> None:
    out = run_python(
        f"""
import json, sys
import numpy as np
import vaelink

heavy = {HEAVY!r}
loaded = lambda: sorted(m for m in sys.modules if m.split(".")[0] in heavy)
at_import = loaded()
vaelink.from_wire(vaelink.to_wire(np.ones((1, 2), np.float32)).body, [1, 2], "float32")
after_float32 = loaded()
wire = vaelink.to_wire(np.array([1.0, -2.5], np.float32), "bfloat16")
back = vaelink.from_wire(wire.body, wire.shape, wire.dtype)
print(json.dumps({{
    "at_import": at_import,
    "after_float32": after_float32,
    "body": wire.body.hex(),
    "dtype": str(back.dtype),
    "values": vaelink.from_bfloat16(back).tolist(),
    "same_dtype": vaelink.dtypes.bfloat16 == np.dtype(sys.modules["ml_dtypes"].bfloat16),
    "wire_dtypes": list(vaelink.dtypes.WIRE_DTYPES),
}}))
"""
    )
    assert out["at_import"] == []
    assert out["after_float32"] == []  # float32 on the wire needs no ml_dtypes either
    assert out["body"] == "803f20c0"  # 1.0 and -2.5 as little-endian bfloat16
    assert out["dtype"] == "bfloat16"
    assert out["values"] == [1.0, -2.5]
    assert out["same_dtype"] is True
    assert out["wire_dtypes"] == ["float16", "bfloat16", "float32", "uint8"]


def test_missing_runtime_names_both_extras() -> None:
    out = run_python(
        """
import json, sys
sys.modules["onnxruntime"] = None  # as if it were not installed
import vaelink
from vaelink.engine import Engine
try:
    Engine()  # the bundled model: everything but the runtime is there
except ImportError as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e), "name": e.name,
                      "engine_error": isinstance(e, vaelink.EngineError)}))
"""
    )
    assert out["type"] == "RuntimeMissingError"
    assert out["engine_error"] is True and out["name"] == "onnxruntime"
    assert "pip install 'vaelink[cpu]'" in out["message"]
    assert "'vaelink[gpu]'" in out["message"]
    assert "\n" not in out["message"]


def test_export_without_a_runtime_says_which_to_install() -> None:
    # `vaelink[export]` brings torch and diffusers but no runtime: the float16 and checking steps
    # need one, so export names the extras before any work rather than failing midway.
    out = run_python(
        """
import json, sys
sys.modules["onnxruntime"] = None
from vaelink.export import _require_torch
try:
    _require_torch()
except ImportError as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e)}))
"""
    )
    assert out["type"] == "RuntimeMissingError"
    assert "pip install 'vaelink[cpu]'" in out["message"]


def test_license_file_ships(pyproject: dict) -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    project = pyproject["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]


def requirement_names(requirements: list) -> set[str]:
    """The distribution names of requirement strings (extras and versions dropped)."""
    names = set()
    for req in requirements:
        if isinstance(req, str):
            name = req.split(";")[0]
            for sep in "[<>=!~ ":
                name = name.split(sep)[0]
            names.add(name.strip().lower().replace("_", "-"))
    return names


def test_runtime_is_an_extra_and_never_forced(pyproject: dict) -> None:
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    runtimes = {"onnxruntime", "onnxruntime-gpu"}
    assert not requirement_names(project["dependencies"]) & runtimes
    assert requirement_names(extras["cpu"]) == {"onnxruntime"}
    # The CUDA build with its CUDA/cuDNN wheels, and NVML for the card's free memory.
    assert requirement_names(extras["gpu"]) == {"onnxruntime-gpu", "nvidia-ml-py"}
    assert any(r.startswith("onnxruntime-gpu[cuda,cudnn]") for r in extras["gpu"])
    for name, requirements in extras.items():
        if name not in ("cpu", "gpu"):
            assert not requirement_names(requirements) & runtimes, name
            assert not any("cpu" in r or "gpu" in r for r in requirements if "vaelink[" in r), name


def test_contributor_tools_stay_out_of_the_published_extras(pyproject: dict) -> None:
    extras = pyproject["project"]["optional-dependencies"]
    groups = pyproject["dependency-groups"]
    assert not {"test", "bench", "dev"} & set(extras)
    assert {"test", "bench", "dev"} <= set(groups)
    # make test / make bench must run on a fresh machine: the CPU runtime comes with them.
    for group in ("test", "bench"):
        (self_ref,) = [r for r in groups[group] if isinstance(r, str) and r.startswith("vaelink[")]
        assert "cpu" in self_ref.split("[")[1].rstrip("]").split(","), group
