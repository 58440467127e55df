"""bfloat16 on the CPU through OpenVINO: the engine's choice of dtype, and parity of its results
with diffusers' float32 forward pass on the same weights (the float32 parity is test_engine.py's)."""

from __future__ import annotations

import sys

import engine_fixtures as ef
import numpy as np
import pytest
import torch

import vaelink
from vaelink import openvino_session
from vaelink.engine import Engine
from vaelink.errors import EngineError, ProviderUnavailableError, RuntimeMissingError

NATIVE = openvino_session.bfloat16_native()
needs_bf16 = pytest.mark.skipif(
    not NATIVE, reason="this CPU has no native bfloat16 (OpenVINO lists no BF16)"
)
SIZE = 64
# The bound: bfloat16 output within 40 dB PSNR of float32.
MIN_PSNR_DB = 40.0


def psnr(actual: np.ndarray, reference: np.ndarray) -> float:
    """dB over the reference's own range."""
    span = float(reference.max() - reference.min())
    mse = float(np.mean((actual.astype(np.float64) - reference) ** 2))
    return 10 * np.log10(span**2 / mse) if mse else float("inf")


@pytest.fixture
def capabilities(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The CPU's capabilities as the engine sees them, for the test to set; the test run's
    VAELINK_CPU_DTYPE (float32, from conftest) removed so that the engine chooses."""
    caps: set[str] = set()
    monkeypatch.setattr(openvino_session, "cpu_capabilities", lambda: frozenset(caps))
    monkeypatch.delenv("VAELINK_CPU_DTYPE")
    return caps


@pytest.fixture
def images(photos: dict[str, np.ndarray]) -> np.ndarray:
    return vaelink.preprocess(ef.photo_batch(photos["astronaut"], 2, SIZE, SIZE))


def test_bfloat16_native_reads_openvinos_capabilities() -> None:
    assert openvino_session.bfloat16_native(frozenset({"FP32", "BF16", "INT8"}))
    # AVX512-FP16 CPUs list FP16; float16 is not bfloat16.
    assert not openvino_session.bfloat16_native(frozenset({"FP32", "FP16", "INT8"}))
    assert not openvino_session.bfloat16_native(frozenset())


def test_the_cpu_default_follows_the_cpu(
    capabilities: set[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = ef.exported("sd15-like", tmp_path_factory)
    assert model.engine().dtype == "float32"
    capabilities.add("BF16")
    engine = model.engine()
    assert engine.dtype == "bfloat16"
    assert engine.execution_providers[0] == "OpenVINO CPU (bfloat16)"
    assert "bfloat16" in repr(engine)
    assert model.engine(dtype="float32").dtype == "float32"  # asked for, kept


def test_the_variable_decides_for_a_whole_service(
    capabilities: set[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    model = ef.exported("sd15-like", tmp_path_factory)
    capabilities.add("BF16")
    monkeypatch.setenv("VAELINK_CPU_DTYPE", "float32")
    assert model.engine().dtype == "float32"
    monkeypatch.setenv("VAELINK_CPU_DTYPE", "bfloat17")
    with pytest.raises(EngineError, match="VAELINK_CPU_DTYPE='bfloat17'"):
        model.engine()


def test_bfloat16_refused_where_it_cannot_run(
    capabilities: set[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = ef.exported("sd15-like", tmp_path_factory)
    with pytest.raises(ProviderUnavailableError, match="AVX512-BF16 or AMX"):
        model.engine(dtype="bfloat16")
    with pytest.raises(EngineError, match="CUDA runs float16 or float32"):
        Engine(model.folder, provider="cuda", dtype="bfloat16")
    with pytest.raises(EngineError, match="unknown dtype"):
        model.engine(dtype="int8")  # type: ignore[arg-type]


def test_without_openvino_the_extra_is_named(
    capabilities: set[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    monkeypatch.setattr(openvino_session, "cpu_capabilities", openvino_session.cpu_capabilities)
    openvino_session._core.cache_clear()
    try:
        assert openvino_session.cpu_capabilities() == frozenset()
        model = ef.exported("sd15-like", tmp_path_factory)
        assert model.engine().dtype == "float32"  # the default needs no OpenVINO
        with pytest.raises(RuntimeMissingError, match=r"vaelink\[openvino\]") as caught:
            model.engine(dtype="bfloat16")
        assert caught.value.name == "openvino"
    finally:
        openvino_session._core.cache_clear()


@needs_bf16
@pytest.mark.parametrize("key", list(ef.CONFIGS))
def test_bfloat16_matches_diffusers_float32(
    key: str, images: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Encode and decode in bfloat16 against diffusers' float32 on the same weights: every KL and
    tiny family, within the issue's 40 dB."""
    model = ef.exported(key, tmp_path_factory)
    engine = model.engine(dtype="bfloat16")
    latents = engine.encode(images)
    expected = model.encode(images)
    assert latents.dtype == np.float32 and latents.shape == expected.shape
    assert psnr(latents, expected) >= MIN_PSNR_DB, psnr(latents, expected)
    decoded = engine.decode(expected, output="float")
    reference = model.decode(expected)
    assert psnr(decoded, reference) >= MIN_PSNR_DB, psnr(decoded, reference)
    # Not float32 under another name: bfloat16 rounding shows.
    assert ef.rel_err(decoded, reference) > 1e-5


@needs_bf16
def test_bfloat16_takes_and_returns_torch_tensors(
    images: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = ef.exported("sd15-like", tmp_path_factory)
    engine = model.engine(dtype="bfloat16")
    latents = engine.encode(torch.from_numpy(images))
    assert isinstance(latents, torch.Tensor) and latents.dtype == torch.float32
    np.testing.assert_array_equal(latents.numpy(), engine.encode(images))
    pixels = engine.decode(latents)
    assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8


@needs_bf16
def test_bfloat16_bundled_model_round_trip(photos: dict[str, np.ndarray]) -> None:
    """The bundled model in bfloat16 reconstructs the photo as well as in float32, within 0.2 dB."""
    pixels = photos["astronaut"][None]
    quality = {}
    for dtype in ("float32", "bfloat16"):
        engine = Engine(provider="cpu", dtype=dtype)  # type: ignore[arg-type]
        back = engine.decode(engine.encode(vaelink.preprocess(pixels)))
        quality[dtype] = psnr(back.astype(np.float64), pixels.astype(np.float64))
    assert abs(quality["bfloat16"] - quality["float32"]) < 0.2, quality
