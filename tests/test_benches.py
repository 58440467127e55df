"""The GPU benchmark rehearsed on the CPU: `benches/bench_engine.py` checks its answers (providers,
torch through IO binding against numpy, diffusers on the same weights, exact tiling against
untiled) before timing, so that its first run on a GPU fails loudly rather than timing wrong work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benches" / "bench_engine.py"


def test_engine_bench_checks_its_answers(tmp_path: Path) -> None:
    env = {**os.environ, "VAELINK_BENCH_RESULTS": str(tmp_path), "VAELINK_BENCH_MACHINE": "t"}
    done = subprocess.run(
        [sys.executable, str(BENCH), "--plan", "medium:64"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "engine-cpu-t.json").read_text())
    assert results["failures"] == []
    checks = results["medium"]["checks"]["64"]
    assert checks["providers"][0] == "CPUExecutionProvider"
    for part in ("encode", "decode"):
        assert checks[f"{part} torch vs numpy"] == 0.0  # the same session, bound in place
        assert checks[f"{part} vs diffusers"] < 1e-3
        assert checks[f"{part} exact vs untiled"] < 1e-4
    assert results["medium"]["first_call_ms"]["64"]["decode_exhaustive"] > 0
    assert results["medium"]["64"]["vaelink_decode_ms"] > 0
